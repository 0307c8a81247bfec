"""The paper's small CNN image path (Li, Teh, Pascanu 2025, Figure 6), timm model ``noprop_cnn`` once
:func:`register_with_timm` has run.

Three unpadded 3x3 convolutions (32, 64, 128 channels) with ReLU, 2x2 max-pooling after the first and
the third, dropout 0.2 after each, then flatten -> FC(256) -> ReLU (the continuous-time image path).
The discrete-time block ends in FC(256) -> BN instead: :func:`ending_without_activation` gives it that.
Unpadded convolutions are the reading under which the paper's published parameter counts (reference
Table 5, per block) are reproduced exactly; ``tests/test_paper_architecture.py`` asserts them.
"""

from typing import Tuple, Union

import torch
from torch import nn


def _side_after_convs(side: int) -> int:
    """An image side after the conv stack: conv 3, pool 2, conv 3, conv 3, pool 2."""
    return ((side - 2) // 2 - 4) // 2


class NoPropCNN(nn.Module):
    """The conv image path of the paper; with ``num_classes=0`` it returns 256 features."""

    def __init__(self, num_classes: int = 0, in_chans: int = 1, img_size: Union[int, Tuple[int, int]] = 28,
                 drop_rate: float = 0.2, feature_dim: int = 256, **_ignored):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(drop_rate),
            nn.Conv2d(32, 64, 3), nn.ReLU(), nn.Dropout(drop_rate),
            nn.Conv2d(64, 128, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(drop_rate),
            nn.Flatten(),
        )
        height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
        self.fc = nn.Sequential(nn.Linear(128 * _side_after_convs(height) * _side_after_convs(width), feature_dim),
                                nn.ReLU())
        self.num_features = feature_dim
        self.num_classes = num_classes
        self.head = nn.Linear(feature_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def ending_without_activation(backbone: nn.Module, width: int) -> bool:
    """Drop the ReLU after the paper CNN's last FC, in place, when that FC has ``width`` outputs.

    Returns whether it did: the features are then ``conv stack -> FC(width)``, ready for a batch norm.
    Any other backbone (or width) is left unchanged.
    """
    if not isinstance(backbone, NoPropCNN) or backbone.num_features != width:
        return False
    backbone.fc[-1] = nn.Identity()
    return True


def noprop_cnn(pretrained: bool = False, **kwargs) -> NoPropCNN:
    """The paper's small CNN (Figure 6 image path); accepts ``in_chans`` and ``img_size``."""
    if pretrained:
        raise ValueError("noprop_cnn has no pretrained weights")
    return NoPropCNN(**kwargs)


def register_with_timm() -> None:
    """Make ``timm.create_model("noprop_cnn", ...)`` and ``timm.list_models()`` know the paper CNN (once)."""
    from timm.models import is_model, register_model
    if not is_model("noprop_cnn"):
        register_model(noprop_cnn)
