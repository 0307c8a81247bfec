"""What the harness hands a method: the problem, the device and the shared backbone factory."""

from dataclasses import dataclass, field
from typing import Callable, Optional, Tuple

import torch


@dataclass
class Task:
    """The learning problem a method is built for.

    ``make_backbone()`` returns a fresh feature extractor (an ``nn.Module`` mapping normalised images
    ``[B, C, H, W]`` to features ``[B, backbone_features]``); every method in a run gets the same one.
    ``train_images``/``train_labels`` are the training split as uint8/long tensors on ``device``, for
    methods whose initialisation looks at data (never the test split); ``val_images``/``val_labels``
    are the held-out validation split of ``--val-split`` (None without it), the only data a method
    may select on; ``normalize`` maps uint8 images to the float tensors ``train_step`` receives.
    """

    num_classes: int
    image_shape: Tuple[int, int, int]
    device: torch.device
    backbone_name: str
    make_backbone: Callable[[], torch.nn.Module]
    backbone_features: int
    normalize: Callable[[torch.Tensor], torch.Tensor]
    train_images: Optional[torch.Tensor] = field(default=None, repr=False)
    train_labels: Optional[torch.Tensor] = field(default=None, repr=False)
    val_images: Optional[torch.Tensor] = field(default=None, repr=False)
    val_labels: Optional[torch.Tensor] = field(default=None, repr=False)
    seed: int = 0

    @property
    def image_dim(self) -> int:
        c, h, w = self.image_shape
        return c * h * w
