"""NoProp-DT's parts: the fixed cosine noise schedule and one discrete-time block (paper Figure 6)."""

import math
from typing import Optional, Tuple

import torch
from torch import nn

from noprop_bench.paper_cnn import ending_without_activation
from noprop_bench_plugins.parts.noprop import LabelEmbedding
from noprop_bench_plugins.parts.noprop_dt_fm import label_embedding_for


class CosineSchedule(nn.Module):
    """Fixed schedule over ``t = 0..T`` (0: noise, T: label) with everything Eq. 3 and Eq. 8 need.

    ``abar_t = abar_min + (abar_max - abar_min) * shape(t)`` with the cosine shape
    ``shape(t) ~ cos^2(pi/2 * (1 - t/T + s) / (1 + s))``, rescaled to exactly 0 at ``t = 0`` and 1 at
    ``t = T``: the usual cosine schedule with time reversed, so ``abar`` increases towards the label,
    and squeezed into ``[abar_min, abar_max]`` (instead of clipped) so it stays strictly increasing
    for any T. From section 2.1 / Appendix A of the paper, with ``abar_t = prod_{s=t}^{T} alpha_s``:

    * ``alpha_T = abar_T``, ``alpha_t = abar_t / abar_{t+1}`` (< 1);
    * ``a_t = sqrt(abar_t) (1 - alpha_{t-1}) / (1 - abar_{t-1})``,
      ``b_t = sqrt(alpha_{t-1}) (1 - abar_t) / (1 - abar_{t-1})``,
      ``c_t = (1 - abar_t) (1 - alpha_{t-1}) / (1 - abar_{t-1})`` for ``t = 1..T``;
    * ``SNR_t = abar_t / (1 - abar_t)``; ``snr_delta[t-1] = SNR_t - SNR_{t-1} > 0`` is block t's loss weight.

    Buffers are indexed by t (``a``, ``b``, ``c`` hold a NaN at t = 0, where they are undefined).
    Computed in float64, stored in float32.
    """

    def __init__(self, blocks: int, offset: float = 0.008, abar_min: float = 1e-3, abar_max: float = 0.999):
        super().__init__()
        if not 0.0 < abar_min < abar_max < 1.0:
            raise ValueError(f"need 0 < abar_min < abar_max < 1, got {abar_min}, {abar_max}")
        t = torch.arange(blocks + 1, dtype=torch.float64)
        shape = torch.cos(math.pi / 2 * (1 - t / blocks + offset) / (1 + offset)) ** 2
        shape = (shape - shape[0]) / (shape[-1] - shape[0])
        abar = abar_min + (abar_max - abar_min) * shape
        alpha = torch.cat([abar[:-1] / abar[1:], abar[-1:]])
        prev_abar, prev_alpha = abar[:-1], alpha[:-1]
        nan = torch.full((1,), float("nan"), dtype=torch.float64)
        a = abar[1:].sqrt() * (1 - prev_alpha) / (1 - prev_abar)
        b = prev_alpha.sqrt() * (1 - abar[1:]) / (1 - prev_abar)
        c = (1 - abar[1:]) * (1 - prev_alpha) / (1 - prev_abar)
        snr = abar / (1 - abar)
        for name, value in (("abar", abar), ("alpha", alpha), ("snr", snr), ("snr_delta", snr[1:] - snr[:-1]),
                            ("a", torch.cat([nan, a])), ("b", torch.cat([nan, b])), ("c", torch.cat([nan, c]))):
            self.register_buffer(name, value.float())
        self.blocks = blocks


def image_projection(backbone: nn.Module, backbone_features: int, width: int) -> nn.Module:
    """What follows ``backbone`` in a DT image path to end in FC(width) -> BN.

    The paper CNN already ends in FC(width): its ReLU is dropped (in place) and only the BN follows.
    Any other backbone keeps its features and gets FC(width) -> BN.
    """
    if ending_without_activation(backbone, width):
        return nn.BatchNorm1d(width)
    return nn.Sequential(nn.Linear(backbone_features, width), nn.BatchNorm1d(width))


class DTBlock(nn.Module):
    """``u_t(z_{t-1}, x) = softmax(logits) . W_Embed`` with Figure 6's discrete-time paths.

    Image path: the run's backbone -> FC(width) -> BN; with the paper CNN (``noprop_cnn``), whose
    features already end in FC(256), its conv stack -> FC(256) -> BN exactly as the figure, so a block
    has the paper's parameter count. Label path: FC(width) -> BN -> ReLU plus a residual branch
    FC -> BN -> ReLU -> FC -> BN; for prototype embeddings instead an image-style module, a fresh
    backbone on ``z`` viewed as an image, built like the image path. Head: concat -> FC(width) -> BN ->
    ReLU -> FC(128) -> BN -> ReLU -> FC(num_classes).
    """

    def __init__(self, backbone: nn.Module, backbone_features: int, num_classes: int, embedding_dim: int,
                 width: int = 256, label_backbone: Optional[nn.Module] = None, image_shape: Tuple[int, ...] = ()):
        super().__init__()
        self.backbone = backbone
        self.image_fc = image_projection(backbone, backbone_features, width)
        self.image_shape = tuple(image_shape)
        self.prototype = label_backbone is not None
        if self.prototype:
            self.label_path = nn.Sequential(label_backbone, image_projection(label_backbone, backbone_features, width))
            self.label_residual = None
        else:
            self.label_path = nn.Sequential(nn.Linear(embedding_dim, width), nn.BatchNorm1d(width), nn.ReLU())
            self.label_residual = nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(),
                                                nn.Linear(width, width), nn.BatchNorm1d(width))
        self.head = nn.Sequential(nn.Linear(2 * width, width), nn.BatchNorm1d(width), nn.ReLU(),
                                  nn.Linear(width, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The image path ``[B, width]``: independent of ``z``."""
        return self.image_fc(self.backbone(x))

    def logits(self, features: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if self.prototype:
            z = z.view(z.shape[0], *self.image_shape)
        label = self.label_path(z)
        if self.label_residual is not None:
            label = label + self.label_residual(label)
        return self.head(torch.cat([features, label], dim=1))

    def forward(self, features: torch.Tensor, z: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """``u_t`` from precomputed ``features``: a convex combination of the rows of ``embedding``."""
        return self.logits(features, z).softmax(dim=1) @ embedding


def dt_blocks(task, count: int, embedding_dim: int, prototype: bool) -> nn.ModuleList:
    """``count`` fresh :class:`DTBlock` for ``task``, each with its own backbone (and label backbone for prototypes)."""
    return nn.ModuleList(
        DTBlock(task.make_backbone(), task.backbone_features, task.num_classes, embedding_dim,
                label_backbone=task.make_backbone() if prototype else None, image_shape=task.image_shape)
        for _ in range(count))


def dt_chain(task, params) -> Tuple[LabelEmbedding, nn.ModuleList]:
    """The label embedding and the ``params["blocks"]`` fresh blocks of a discrete-time chain (NoProp-DT and
    its end-to-end Backprop baseline), built in that order from ``embedding``, ``dim`` and ``blocks``."""
    embedding = label_embedding_for(task, params["embedding"], params["dim"])
    blocks = dt_blocks(task, params["blocks"], embedding.dim, prototype=params["embedding"] == "prototype")
    return embedding, blocks
