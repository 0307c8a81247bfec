"""``check_dataset``: a dataset plugin's splits checked against the contract."""

from typing import List, Optional, Type

import torch

from ..conformance import describe_class
from ..datasets import AUGMENTATIONS, Dataset, Split, layout_fixes


def check_dataset(cls: Type[Dataset], argument: Optional[str] = None, root: Optional[str] = None) -> None:
    """Load both splits of ``cls(argument, root=root, download=False)`` and check them; an
    ``AssertionError`` lists a fix for each violation.

    Point ``argument``/``root`` at small files (a few images per class) so the check takes seconds.
    """
    fixes: List[str] = []
    if not cls.name:
        fixes.append("set the class attribute name = 'my_dataset'")
    dataset = cls(argument, root=root, download=False)
    splits = {}
    for name in ("train", "test"):
        try:
            split = dataset.load(name)
        except ValueError as error:  # Split refused what load built (float images, numpy labels)
            fixes.append(f"load({name!r}): {error}")
            continue
        if not isinstance(split, Split):
            fixes.append(f"load({name!r}) must return noprop_bench.Split(images, labels), not {type(split).__name__}")
            continue
        splits[name] = split
        fixes.extend(_split_fixes(name, split, dataset))
    classes = list(dataset.classes)
    if not classes or len(set(classes)) != len(classes) or not all(isinstance(c, str) for c in classes):
        fixes.append(f"classes must be distinct names (strings), one per class; got {classes!r}")
    if len(splits) == 2:
        shapes = {name: tuple(split.images.shape[1:]) for name, split in splits.items()}
        if shapes["train"] != shapes["test"]:
            fixes.append(f"train and test images must have the same shape [C, H, W]; got {shapes}")
        fixes.extend(layout_fixes(shapes["train"], dataset))
    if dataset.augment not in AUGMENTATIONS:
        fixes.append(f"augment must be one of {', '.join(AUGMENTATIONS)}, not {dataset.augment!r}")
    if fixes:
        lines = "\n".join(f"  - {fix}" for fix in fixes)
        raise AssertionError(f"{describe_class(cls)} breaks the dataset contract; to fix:\n{lines}")


def _split_fixes(name: str, split: Split, dataset: Dataset) -> List[str]:
    fixes = []
    images, labels = split.images, split.labels
    if images.dtype != torch.uint8 or images.dim() != 4:
        fixes.append(f"{name} images must be uint8 [N, C, H, W], not {images.dtype} of shape {list(images.shape)}")
    if labels.dtype != torch.int64 or labels.dim() != 1:
        fixes.append(f"{name} labels must be int64 [N] (torch.long), not {labels.dtype} of shape {list(labels.shape)}")
    if len(labels) == 0:
        fixes.append(f"{name} split is empty")
    elif labels.min() < 0 or labels.max() >= len(dataset.classes):
        fixes.append(f"{name} labels must lie in 0..{len(dataset.classes) - 1} (one per name in classes); found "
                     f"{int(labels.min())}..{int(labels.max())}")
    return fixes
