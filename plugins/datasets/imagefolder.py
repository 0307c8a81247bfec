"""``imagefolder:PATH``: images in ``PATH/train/<class>/*`` and ``PATH/test/<class>/*``.

Class names are the folder names, sorted; train and test must have the same ones. Images are decoded
once (JPEG, PNG and the other formats Pillow reads) and the uint8 arrays cached under
the data root, keyed by the folder's path and every file's name, size and modification time, so later
runs load in seconds and any change to the files rebuilds the cache. A digest of every file's name and
bytes is the dataset's ``content_id``: trials on changed files are new trials, while a copy of the folder
(other modification times, same files) gives the same one. All images must share one size;
grayscale stays one channel unless some image is colour, then all become RGB. 16-bit grayscale is scaled
to 8 bits; 32-bit integer and floating-point images, whose range no format fixes, are refused.
Normalisation statistics are measured on the training split.
"""

import hashlib
import io
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from noprop_bench import Dataset, Split, UsageError, hookimpl
from noprop_bench.data_root import ArrayCache, data_root, tree_key

SPLITS = ("train", "test")
GRAY_MODES = ("1", "L", "LA")
UNSCALED_MODES = {"I": "32-bit integer", "F": "floating-point"}  # Pillow would clip these to 0..255
DECODER_VERSION = 3  # part of the cache key: caches of an older decoding are rebuilt (3: with content_sha256)


class ImageFolder(Dataset):
    """Image folder ARG/{train,test}/<class>/* (any format Pillow reads)."""

    name = "imagefolder"
    takes_argument = True
    augment = "none"  # unknown data: no augmentation unless --augment asks for it

    def __init__(self, argument=None, root=None, download=True):
        super().__init__(argument, root=root, download=download)
        if not argument.strip():
            raise UsageError("imagefolder needs a folder: --dataset imagefolder:PATH, with PATH/train/<class>/* "
                             "and PATH/test/<class>/*")
        # absolute, "." and ".." taken out: one name in records, workers and reruns. Links are kept as given: a
        # cluster's nodes may reach their own copies through one link path, which its target would not name
        self.path = Path(os.path.abspath(Path(argument).expanduser()))
        self.argument = str(self.path)
        self.files = {split: _scan_split(self.path, split) for split in SPLITS}
        train, test = (sorted(self.files[split]) for split in SPLITS)
        if train != test:
            only_train, only_test = sorted(set(train) - set(test)), sorted(set(test) - set(train))
            raise UsageError(f"imagefolder {self.path}: train and test classes differ: only in train: "
                             f"{', '.join(only_train) or '-'}; only in test: {', '.join(only_test) or '-'}")
        if len(train) < 2:  # every prediction would be right: an accuracy of 100% that says nothing
            raise UsageError(f"imagefolder {self.path}: one class ({train[0]}); classification needs at least two "
                             f"class folders in train/ and test/")
        self.classes = tuple(train)
        self.label = self.path.resolve().name
        self._arrays = None

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        return tuple(self._decoded()["train_images"].shape[1:])

    @property
    def content_id(self) -> str:
        return str(self._decoded()["content_sha256"])

    @property
    def mean(self):
        return tuple(float(v) for v in self._decoded()["mean"])

    @property
    def std(self):
        return tuple(float(v) for v in self._decoded()["std"])

    def load(self, split: str) -> Split:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}")
        arrays = self._decoded()
        return Split(torch.from_numpy(arrays[f"{split}_images"]), torch.from_numpy(arrays[f"{split}_labels"]))

    def _decoded(self) -> Dict[str, np.ndarray]:
        if self._arrays is None:
            entries = [(f"{split}/{name}/{file.name}", size, mtime)
                       for split in SPLITS for name, files in sorted(self.files[split].items())
                       for file, size, mtime in files] + [("decoder", DECODER_VERSION, 0)]
            keys = tree_key(self.path, entries)
            cache = ArrayCache(data_root(self.root), "imagefolder")
            self._arrays = cache.load(*keys)
            if self._arrays is None:
                count = sum(len(files) for split in SPLITS for files in self.files[split].values())
                _say(f"imagefolder: decoding the {count} images of {self.path} ...")
                started = time.perf_counter()
                self._arrays = self._decode_all()
                saved = cache.save(*keys, self._arrays)
                _say(f"imagefolder: decoded {count} images in {time.perf_counter() - started:.1f}s; "
                     + (f"later runs read them from {saved}" if saved else
                        f"not cached ({cache.directory} cannot be written to), so every run decodes them again"))
        return self._arrays

    def _decode_all(self) -> Dict[str, np.ndarray]:
        arrays = {}
        digest = hashlib.sha256()
        for split in SPLITS:
            paths, labels = [], []
            for index, name in enumerate(self.classes):
                paths += [file for file, _, _ in self.files[split][name]]
                labels += [index] * len(self.files[split][name])
            arrays[f"{split}_images"] = _decode_with_progress(paths, split, digest, self.path)
            arrays[f"{split}_paths"] = paths
            arrays[f"{split}_labels"] = np.asarray(labels, dtype=np.int64)
        images = [*arrays["train_images"], *arrays["test_images"]]
        size = images[0].shape[1:]
        everything = arrays["train_paths"] + arrays["test_paths"]
        for path, image in zip(everything, images):
            if image.shape[1:] != size:
                raise UsageError(f"imagefolder: {path} is {image.shape[2]}x{image.shape[1]} pixels but "
                                 f"{everything[0]} is {size[1]}x{size[0]}; all images must have one size")
        colour = sum(image.shape[0] == 3 for image in images)
        channels = 3 if colour else 1
        if 0 < colour < len(images):  # one stray colour file changes the whole dataset: say so
            _say(f"imagefolder: {colour} of {len(images)} images are colour, so all become RGB (3 channels); "
                 f"the first: {next(p for p, image in zip(everything, images) if image.shape[0] == 3)}")
        for split in SPLITS:
            stacked = torch.stack([_to_channels(image, channels) for image in arrays.pop(f"{split}_images")])
            arrays[f"{split}_images"] = stacked.numpy()
            del arrays[f"{split}_paths"]
        arrays["mean"], arrays["std"] = _channel_stats(arrays["train_images"])
        arrays["content_sha256"] = np.asarray(digest.hexdigest())
        return arrays


def _scan_split(path: Path, split: str) -> Dict[str, List[Tuple[Path, int, int]]]:
    """``{class: [(file, size, mtime_ns), ...]}`` for ``path/split``, refusing anything but class folders."""
    directory = path / split
    if not directory.is_dir():
        what = ("no such directory" if not path.exists() else "a file, not a folder" if not path.is_dir()
                else f"it has no {split}/ folder")
        raise UsageError(f"imagefolder {path}: {what}; expected {path}/train/<class>/* and {path}/test/<class>/*")
    classes = {}
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            raise UsageError(f"imagefolder: {entry.path} is not a class folder; {directory} may hold only "
                             f"one folder per class")
        files = []
        for item in sorted(os.scandir(entry.path), key=lambda e: e.name):
            if item.name.startswith("."):
                continue  # .DS_Store and friends
            if not item.is_file():
                raise UsageError(f"imagefolder: {item.path} is not a file; class folders hold images only")
            stat = item.stat()
            files.append((Path(item.path), stat.st_size, stat.st_mtime_ns))
        if not files:
            raise UsageError(f"imagefolder: class folder {entry.path} is empty")
        classes[entry.name] = files
    if not classes:
        raise UsageError(f"imagefolder: {directory} has no class folders")
    return classes


PROGRESS_SECONDS = 15.0


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _decode_with_progress(paths: List[Path], split: str, digest, root: Path) -> List[torch.Tensor]:
    """Every image of ``paths``, with a line every ``PROGRESS_SECONDS`` on a long decode; each file's name
    (relative to ``root``) and bytes go into ``digest``."""
    images, last = [], time.perf_counter()
    for index, path in enumerate(paths):
        try:
            content = path.read_bytes()
        except OSError as error:
            raise UsageError(f"imagefolder: {path} cannot be read ({error})") from None
        name = path.relative_to(root).as_posix().encode()
        digest.update(len(name).to_bytes(8, "little") + name + len(content).to_bytes(8, "little") + content)
        images.append(_decode(path, content))
        if time.perf_counter() - last >= PROGRESS_SECONDS:
            last = time.perf_counter()
            _say(f"imagefolder: {split}: {index + 1} of {len(paths)} images decoded")
    return images


def _decode(path: Path, content: bytes) -> torch.Tensor:
    """One image (the bytes of ``path``) as uint8 ``[C, H, W]``, C = 1 for grayscale files, else 3 (alpha and
    palettes resolved)."""
    try:
        with Image.open(io.BytesIO(content)) as opened:
            # Pillow before 10.3 opens a 16-bit grayscale PNG as "I" (PNG holds at most 16 bits)
            sixteen_bit = opened.mode.startswith("I;16") or (opened.mode == "I" and opened.format == "PNG")
            if opened.mode in UNSCALED_MODES and not sixteen_bit:
                raise UsageError(f"imagefolder: {path} holds {UNSCALED_MODES[opened.mode]} grayscale pixels (Pillow "
                                 f"mode {opened.mode}), whose range is not fixed; save the images with 8 or 16 bits")
            if sixteen_bit:  # 0..65535 onto 0..255, rounded (Pillow's "L" would clip)
                array = ((np.asarray(opened).astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
            else:
                array = np.asarray(opened.convert("L" if opened.mode in GRAY_MODES else "RGB"))
    except UsageError:
        raise
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise UsageError(f"imagefolder: {path} is not an image that can be read ({error})") from None
    image = torch.from_numpy(array.copy())
    return image.unsqueeze(0) if image.dim() == 2 else image.permute(2, 0, 1)


def _to_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    return image.expand(3, -1, -1) if image.shape[0] != channels else image


def _channel_stats(images: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Exact per-channel mean and standard deviation on the 0..1 scale, from 256-bin histograms."""
    values = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for channel in range(images.shape[1]):
        counts = np.bincount(images[:, channel].ravel(), minlength=256).astype(np.float64)
        mean = (counts * values).sum() / counts.sum()
        means.append(mean)
        std = np.sqrt((counts * (values - mean) ** 2).sum() / counts.sum())
        stds.append(max(std, 1 / 255))  # images of one flat colour must not divide by zero
    return np.asarray(means), np.asarray(stds)


@hookimpl
def register_datasets(register):
    register(ImageFolder)
