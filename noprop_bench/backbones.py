"""Backbones from timm: any model name, used as a feature extractor, with a small-image stem."""

from typing import Tuple, Union

import torch
from torch import nn

from . import paper_cnn
from .errors import UsageError

SMALL_IMAGE_MAX_SIDE = 64
PAPER_CNN = "noprop_cnn"


def timm_with_paper_cnn():
    """timm, with ``noprop_cnn`` registered. Imported on first use only: timm loads torchvision and torch's
    compiler stack, seconds that every process of a run on the paper CNN (its default) would otherwise pay."""
    import timm
    paper_cnn.register_with_timm()
    return timm


def _adapt_stem_for_small_images(model: nn.Module) -> bool:
    """Give the model a 3x3 stride-1 first convolution and drop a stem max-pool, in place.

    ImageNet stems (7x7 stride 2 plus max-pool) shrink a 28-32 px image fourfold before the first
    block; CIFAR-style networks keep the resolution instead. Patch embeddings (kernel equal to
    stride) are left alone. Returns whether anything changed.
    """
    changed = False
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                patchify = child.kernel_size == child.stride  # a ViT-style patch embedding: keep it
                if not patchify and (child.stride != (1, 1) or child.kernel_size != (3, 3)):
                    setattr(parent, child_name, nn.Conv2d(
                        child.in_channels, child.out_channels, 3, stride=1, padding=1,
                        bias=child.bias is not None))
                    changed = True
                break
        else:
            continue
        break
    if isinstance(getattr(model, "maxpool", None), nn.MaxPool2d):
        model.maxpool = nn.Identity()
        changed = True
    return changed


def check_backbone_name(name: str) -> None:
    """Raise a :class:`UsageError` naming what is accepted unless timm knows ``name``."""
    if name != PAPER_CNN and name not in timm_with_paper_cnn().list_models():
        raise UsageError(
            f"unknown backbone {name!r}; any timm model name is accepted, e.g. resnet18, resnet50, "
            f"noprop_cnn (`python -c 'import timm; print(timm.list_models())'` lists all)"
        )


def create_backbone(name: str, in_chans: int, image_size: Union[int, Tuple[int, int]]) -> nn.Module:
    """A timm model without classifier head, for ``in_chans``-channel images of ``image_size`` px (a side,
    or height and width).

    Images of at most 64 px get a 3x3 stride-1 stem and no stem max-pool (see ``--help``).
    The returned module maps ``[B, C, H, W]`` to ``[B, num_features]``.
    """
    check_backbone_name(name)
    if name == PAPER_CNN:  # what timm.create_model would build, without importing timm
        return paper_cnn.noprop_cnn(num_classes=0, in_chans=in_chans, img_size=image_size)
    timm = timm_with_paper_cnn()
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans,
                                  img_size=image_size)
    except TypeError:
        model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans)
    longest_side = image_size if isinstance(image_size, int) else max(image_size)
    if longest_side <= SMALL_IMAGE_MAX_SIDE:
        _adapt_stem_for_small_images(model)
    return model


def feature_dim(model: nn.Module, image_shape: Tuple[int, int, int]) -> int:
    """The width of the features ``model`` produces, found by one forward pass on zeros."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(2, *image_shape))
    model.train(was_training)
    return out.shape[-1]
