"""The Dataset contract and the in-memory tensor pipeline.

A dataset hands the harness whole splits as uint8 tensors; the pipeline keeps them on the training
device, slices batches from a seeded permutation, and normalises and augments whole batches there.
"""

import math
import numbers
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

import torch

from .errors import UsageError

AUGMENTATIONS = ("none", "crop_flip")


def layout_fixes(image_shape: Sequence[int], dataset: "Dataset") -> list:
    """What is wrong between a split's images ``[C, H, W]`` and what ``dataset`` declares (its
    ``image_shape``, one ``mean`` and one positive ``std`` value per channel, two classes or more), each said
    as a fix; empty when they agree."""
    image_shape = tuple(image_shape)
    if image_shape[-1] in (1, 3) and image_shape[0] not in (1, 3):
        return [f"the images look channels-last [N, H, W, C] ({list(image_shape)} per image): store "
                f"images.permute(0, 3, 1, 2).contiguous(), which is [N, C, H, W]"]
    fixes = []
    if image_shape != tuple(dataset.image_shape):
        fixes.append(f"image_shape must be the images' [C, H, W]: {image_shape}, not {tuple(dataset.image_shape)} "
                     f"(set it in __init__ when it depends on the files)")
    counts = [_length(stat) for stat in (dataset.mean, dataset.std)]
    if counts != [image_shape[0]] * 2:
        fixes.append(f"mean and std need one value per channel ({image_shape[0]}), as a tuple such as (0.5,); got "
                     f"{counts[0]} and {counts[1]}")
    elif not all(isinstance(v, numbers.Real) and math.isfinite(v) and v > 0 for v in map(_number, dataset.std)):
        fixes.append(f"std must hold positive numbers (normalisation divides by it), on the 0..1 scale such as "
                     f"(0.25,); got {tuple(dataset.std)!r}")
    if _length(dataset.classes) in (0, 1):
        fixes.append(f"classes must name two classes or more (with one, every prediction is right); got "
                     f"{tuple(dataset.classes)!r}")
    return fixes


def _number(value: Any) -> Any:
    """A plain number for a Python or 0-d tensor value; anything else as it is."""
    return value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value


def _length(values: Any) -> Any:
    """How many values ``values`` holds, or its ``repr`` when it is one number (0.5, a 0-d tensor)."""
    try:
        return len(values)
    except TypeError:
        return repr(values)


@dataclass
class Split:
    """One split held in memory: ``images`` uint8 ``[N, C, H, W]``, ``labels`` long ``[N]``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self):
        for field_name, value in (("images", self.images), ("labels", self.labels)):
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{field_name} must be a torch tensor, not {type(value).__module__}."
                                 f"{type(value).__name__}: pass torch.as_tensor({field_name}"
                                 f"{', dtype=torch.long' if field_name == 'labels' else ''})")
        if self.images.dim() != 4:
            raise ValueError(f"images must be a uint8 tensor [N, C, H, W], not of shape {list(self.images.shape)}")
        if self.images.dtype != torch.uint8:
            hint = (": pass images.mul(255).round().to(torch.uint8) for values in 0..1, images.to(torch.uint8) "
                    "for 0..255 (the harness normalises with the dataset's mean and std)"
                    if self.images.is_floating_point() else ": pass images.to(torch.uint8)")
            raise ValueError(f"images must be a uint8 tensor [N, C, H, W], not {self.images.dtype}{hint}")
        if len(self.images) != len(self.labels):
            raise ValueError("images and labels differ in length")

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device) -> "Split":
        return Split(self.images.to(device), self.labels.to(device=device, dtype=torch.long))


class Dataset:
    """A classification dataset the harness can train and test on.

    Subclasses set ``name`` (CLI name; ``name:ARG`` passes ``ARG`` to ``__init__``), ``label``
    (table column), ``classes``, ``image_shape`` ``(C, H, W)``, ``mean``/``std`` per channel (on the
    0..1 scale), ``augment`` (``"none"`` or ``"crop_flip"``) and ``default_backbone`` (used when
    ``--backbone`` is not given), and implement ``load(split)`` for
    ``"train"`` and ``"test"``. ``classes``/``image_shape`` may be set in ``__init__`` when they
    depend on ``ARG`` or on the files.
    """

    name: str = ""
    label: str = ""
    classes: Sequence[str] = ()
    image_shape: Tuple[int, int, int] = (1, 28, 28)
    mean: Sequence[float] = (0.5,)
    std: Sequence[float] = (0.5,)
    augment: str = "none"
    default_backbone: str = "resnet18"
    takes_argument: bool = False

    def __init__(self, argument: Optional[str] = None, root: Optional[str] = None, download: bool = True):
        if argument is not None and not self.takes_argument:
            raise UsageError(f"dataset {self.name!r} takes no argument (got {self.name}:{argument})")
        if argument is None and self.takes_argument:
            raise UsageError(f"dataset {self.name!r} needs an argument: {self.name}:ARG")
        self.argument = argument
        self.root = root
        self.download = download

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def display_name(self) -> str:
        return self.label or self.name

    @property
    def spec(self) -> str:
        """``NAME`` or ``NAME:ARGUMENT``, as trial records name the dataset: the same text must mean the same
        data from any working directory (a worker's, a later run's), so a dataset taking a path makes
        ``self.argument`` absolute."""
        return self.name if self.argument is None else f"{self.name}:{self.argument}"

    @property
    def content_id(self) -> Optional[str]:
        """A digest of the data where its files can change under one spec (a folder of images); None where
        the spec fixes the data. It is part of every trial's identity, so changed data trains new trials."""
        return None

    def load(self, split: str) -> Split:
        """The whole ``split`` (``"train"`` or ``"test"``) as uint8 images and labels."""
        raise NotImplementedError


class Normalizer:
    """Maps uint8 images to normalised float images on their device."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device):
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255.0
        self.inv_std = 1.0 / (torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255.0)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean) * self.inv_std


def to_device_without_waiting(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` (in host memory) on ``device``; to CUDA through pinned memory without waiting for the copy,
    where a copy from pageable memory would hold the host until the device had drained."""
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def crop_flip(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, for a whole uint8 batch at once."""
    n, c, h, w = images.shape
    device = images.device
    height, width = h + 2 * padding, w + 2 * padding
    dy = torch.randint(0, 2 * padding + 1, (n, 1, 1), generator=generator, device="cpu")
    dx = torch.randint(0, 2 * padding + 1, (n, 1, 1), generator=generator, device="cpu")
    flip = torch.rand((n, 1, 1), generator=generator, device="cpu") < 0.5
    dy, dx, flip = to_device_without_waiting(torch.stack([dy, dx, flip.long()]), device)
    flip = flip.bool()
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    # whole rows by index_select (contiguous copies), then whole columns of a width-major copy:
    # far cheaper than gathering every pixel by advanced indexing
    planes = (torch.arange(n, device=device).view(n, 1, 1) * c + torch.arange(c, device=device).view(1, c, 1)) * height
    rows = planes + dy + torch.arange(h, device=device).view(1, 1, h)
    cropped = padded.reshape(n * c * height, width).index_select(0, rows.reshape(-1)).view(n, c, h, width)
    cols = torch.arange(w, device=device).view(1, w)
    cols = torch.where(flip.view(n, 1), w - 1 - cols, cols) + dx.view(n, 1)
    columns = cropped.permute(0, 3, 1, 2).reshape(n * width, c * h)
    picked = columns.index_select(0, (torch.arange(n, device=device).view(n, 1) * width + cols).reshape(-1))
    return picked.view(n, w, c, h).permute(0, 2, 3, 1).contiguous()


class BatchStream:
    """Endless training batches from a split in memory: a fresh seeded permutation every epoch.

    The last incomplete batch of an epoch is dropped, so every step sees ``batch_size`` samples.
    """

    def __init__(self, split: Split, batch_size: int, normalize: Normalizer, augment: str, seed: int):
        if augment not in AUGMENTATIONS:
            raise UsageError(f"unknown augmentation {augment!r}; accepted: {', '.join(AUGMENTATIONS)}")
        if batch_size > len(split):
            raise UsageError(f"batch size {batch_size} exceeds the {len(split)} training images")
        self.split = split
        self.batch_size = batch_size
        self.normalize = normalize
        self.augment = augment
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self._order = None
        self._position = 0
        self._new_epoch()

    def _new_epoch(self):
        self._order = torch.randperm(len(self.split), generator=self.generator).to(self.split.labels.device)
        self._position = 0

    def next(self) -> Tuple[torch.Tensor, torch.Tensor]:
        if self._position + self.batch_size > len(self._order):
            self.epoch += 1
            self._new_epoch()
        index = self._order[self._position:self._position + self.batch_size]
        self._position += self.batch_size
        images = self.split.images.index_select(0, index)  # faster than advanced indexing
        if self.augment == "crop_flip":
            images = crop_flip(images, self.generator)
        return self.normalize(images), self.split.labels.index_select(0, index)


def eval_batches(split: Split, normalize: Normalizer, batch_size: int):
    """The split in order, in large normalised batches, for evaluation."""
    for start in range(0, len(split), batch_size):
        yield normalize(split.images[start:start + batch_size]), split.labels[start:start + batch_size]
