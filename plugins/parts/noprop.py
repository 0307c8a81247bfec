"""Pieces shared by the NoProp methods (CT, DT and FM) and the adjoint baseline.

* :class:`LabelEmbedding`: ``W_Embed`` as one-hot (fixed), learned (orthogonal init) or prototype
  (each class starts at its medoid training image), as in section 2.2.1 of the paper.
* :func:`sinusoidal_embedding`: the 64-dim positional embedding of a scalar time.
* :class:`MonotoneSchedule`: the learnable noise schedule of Appendix B, ``SNR(t) = exp(-gamma(t))``.
* :class:`CTModel`: ``u(z, x, t)`` of Figure 6 split into ``features(x)`` (the image path, which does
  not depend on ``z`` or ``t``, so it is computed once and reused) and ``head(features, z, t)``.
"""

import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from noprop_bench import UsageError

EMBEDDINGS = ("one-hot", "learned", "prototype")
MIN_IMAGES_PER_CLASS = 2  # a medoid needs at least one other image to measure distances to


# -- label embeddings --------------------------------------------------------------------------

def class_medoids(images: torch.Tensor, labels: torch.Tensor, num_classes: int, chunk: int = 512) -> torch.Tensor:
    """Per class, the image with the smallest median distance to all the other images of its class.

    ``images`` are float ``[N, D]``; returns ``[num_classes, D]``. The whole class is used (the paper's
    medoid); distances are computed ``chunk`` rows at a time, so memory stays at ``chunk x class size``
    distances however large the class.
    """
    rows = []
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()
        if len(members) < MIN_IMAGES_PER_CLASS:
            raise UsageError(
                f"prototype embedding needs at least {MIN_IMAGES_PER_CLASS} training images per class to pick "
                f"medoids; class {c} has {len(members)}. Use embedding=one-hot or embedding=learned")
        group = images[members]
        n = len(group)
        medians = []
        for start in range(0, n, chunk):
            distances = torch.cdist(group[start:start + chunk], group)
            # median over the *other* images: drop each row's zero self-distance
            own = torch.arange(start, min(start + chunk, n), device=distances.device)
            keep = torch.ones_like(distances, dtype=torch.bool)
            keep[torch.arange(len(own)), own] = False
            medians.append(distances[keep].view(len(own), n - 1).median(dim=1).values)
        rows.append(group[torch.cat(medians).argmin()])
    return torch.stack(rows)


class LabelEmbedding(nn.Module):
    """``W_Embed`` ``[num_classes, dim]``; ``weight`` is a buffer (one-hot) or a parameter (learned, prototype).

    ``learned`` rows start orthonormal when ``dim >= num_classes`` (``nn.init.orthogonal_``; otherwise
    its columns are orthonormal, the paper's "when possible"). ``prototype`` needs ``medoids``
    (``[num_classes, image_dim]``, normalised images), see :func:`class_medoids`.
    """

    def __init__(self, kind: str, num_classes: int, dim: int = 20, medoids: Optional[torch.Tensor] = None):
        super().__init__()
        if kind not in EMBEDDINGS:
            raise UsageError(f"unknown embedding {kind!r}; accepted: {', '.join(EMBEDDINGS)}")
        self.kind = kind
        if kind == "one-hot":
            self.register_buffer("weight", torch.eye(num_classes))
        elif kind == "learned":
            self.weight = nn.Parameter(nn.init.orthogonal_(torch.empty(num_classes, dim)))
        else:
            if medoids is None:
                raise ValueError("prototype embedding needs the class medoids")
            self.weight = nn.Parameter(medoids.detach().clone().float())

    @property
    def dim(self) -> int:
        return self.weight.shape[1]

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.weight[y]


# -- time embedding ------------------------------------------------------------------------------

def sinusoidal_embedding(t: torch.Tensor, dim: int = 64, scale: float = 1000.0) -> torch.Tensor:
    """Transformer-style sin/cos embedding ``[len(t), dim]`` of times ``t`` in [0, 1].

    ``t`` is multiplied by ``scale`` first, so the fastest frequency resolves the paper's 1000-step
    grid (with t in [0, 1] unscaled, every channel would be nearly linear in t).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float().reshape(-1, 1) * scale) * freqs
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


# -- noise schedule ------------------------------------------------------------------------------

class MonotoneSchedule(nn.Module):
    """Learnable ``gamma(t)``, decreasing in t, with ``abar(t) = sigmoid(-gamma(t))`` and ``SNR = exp(-gamma)``.

    ``gamma_tilde(t) = a t + sum_j c_j sigmoid(w_j t + b_j)`` is a 2-layer network whose weights
    ``a, c_j, w_j`` are kept positive by a softplus, so it is strictly increasing. It is normalised to
    ``gbar(t) in [0, 1]`` and ``gamma(t) = gamma0 + (gamma1 - gamma0) (1 - gbar(t))``: ``gamma(0) = gamma1``
    (noisy end), ``gamma(1) = gamma0`` (label end). Both endpoints are trainable; ``gamma1`` is stored as
    ``gamma0 + softplus(gap)`` so ``gamma1 > gamma0`` always holds and SNR' can never turn negative
    (an inverted schedule would make the loss weight negative: gradient ascent). Derivatives are in
    closed form, not autograd, so SNR' costs no second backward pass.
    """

    def __init__(self, gamma0: float = -5.0, gamma1: float = 5.0, hidden: int = 64):
        super().__init__()
        if not gamma1 > gamma0:
            raise UsageError(f"schedule endpoints need gamma1 > gamma0, got gamma0={gamma0}, gamma1={gamma1}")
        self.gamma0 = nn.Parameter(torch.tensor(float(gamma0)))
        gap = float(gamma1 - gamma0)
        self.gap = nn.Parameter(torch.tensor(gap + math.log(-math.expm1(-gap))))  # softplus^-1(gap)
        self.raw_a = nn.Parameter(torch.tensor(0.0))
        self.raw_w = nn.Parameter(torch.randn(hidden) * 0.1)
        self.b = nn.Parameter(torch.randn(hidden) * 0.1)
        self.raw_c = nn.Parameter(torch.randn(hidden) * 0.1 - 3.0)  # small: start close to linear

    @property
    def gamma1(self) -> torch.Tensor:
        return self.gamma0 + F.softplus(self.gap)

    def _tilde(self, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``gamma_tilde(t)`` and its derivative, for a 1-D ``t``."""
        a, w, c = F.softplus(self.raw_a), F.softplus(self.raw_w), F.softplus(self.raw_c)
        s = torch.sigmoid(t.reshape(-1, 1) * w + self.b)
        value = a * t + (s * c).sum(dim=1)
        slope = a + (s * (1 - s) * w * c).sum(dim=1)
        return value, slope

    def forward(self, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``gamma(t)`` and ``dgamma/dt`` (negative), elementwise for a 1-D ``t``."""
        n = t.shape[0]
        # one pass of the network over t and the ends [0, 1] (made on the device: no host copy)
        value, slope = self._tilde(torch.cat([t, torch.arange(2.0, dtype=t.dtype, device=t.device)]))
        start, end = value[n], value[n + 1]
        span = end - start
        gbar = (value[:n] - start) / span
        width = self.gamma1 - self.gamma0
        return self.gamma0 + width * (1 - gbar), -width * slope[:n] / span

    def endpoints(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``gamma(0)`` and ``gamma(1)`` as ``forward`` gives them (``gbar`` is 0 and 1 there), without
        running the network."""
        return self.gamma0 + (self.gamma1 - self.gamma0), self.gamma0

    def abar(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(-self(t)[0])

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(-self(t)[0])

    def snr_prime(self, t: torch.Tensor) -> torch.Tensor:
        gamma, dgamma = self(t)
        return -dgamma * torch.exp(-gamma)


# -- the continuous-time model ---------------------------------------------------------------------

class CTModel(nn.Module):
    """``u(z, x, t) = softmax(logits) . W_Embed`` with Figure 6's continuous-time paths, no batch norm.

    Image path: the run's backbone (``F`` features). Label path: FC(256) -> ReLU, or for prototype
    embeddings a fresh copy of the backbone applied to ``z`` viewed as an image. Time path:
    sinusoidal(``time_dim``) -> FC(256) -> ReLU. Head: concat -> FC(256) -> ReLU -> FC(128) -> ReLU ->
    FC(num_classes). The first head layer is held as three blocks of one linear map (image, label,
    time), which is the same function as concat-then-FC; it lets ``features(x)`` return the image
    block's contribution once and lets one time row serve a whole batch at inference.
    """

    def __init__(self, backbone: nn.Module, backbone_features: int, num_classes: int, embedding_dim: int,
                 time_dim: int = 64, width: int = 256, label_backbone: Optional[nn.Module] = None,
                 label_features: int = 0, image_shape: Tuple[int, ...] = ()):
        super().__init__()
        self.backbone = backbone
        self.time_dim = time_dim
        self.image_shape = tuple(image_shape)
        if label_backbone is not None:
            self.label_path = label_backbone
            label_width = label_features
        else:
            self.label_path = nn.Sequential(nn.Linear(embedding_dim, width), nn.ReLU())
            label_width = width
        self.time_path = nn.Sequential(nn.Linear(time_dim, width), nn.ReLU())
        self.fuse_image = nn.Linear(backbone_features, width)
        self.fuse_label = nn.Linear(label_width, width, bias=False)
        self.fuse_time = nn.Linear(width, width, bias=False)
        self.rest = nn.Sequential(nn.ReLU(), nn.Linear(width, 128), nn.ReLU(), nn.Linear(128, num_classes))
        self.prototype = label_backbone is not None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The image path's contribution to the first head layer ``[B, width]``: independent of z and t."""
        return self.fuse_image(self.backbone(x))

    def time_features(self, t: torch.Tensor) -> torch.Tensor:
        """The time path's contribution ``[len(t), width]`` (one row broadcasts over a batch)."""
        return self.fuse_time(self.time_path(sinusoidal_embedding(t, self.time_dim)))

    def logits(self, features: torch.Tensor, z: torch.Tensor, time_features: torch.Tensor) -> torch.Tensor:
        if self.prototype:
            z = z.view(z.shape[0], *self.image_shape)
        return self.rest(features + self.fuse_label(self.label_path(z)) + time_features)

    def head(self, features: torch.Tensor, z: torch.Tensor, t: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """``u(z, x, t)`` from precomputed ``features``; ``t`` is ``[B]`` or ``[1]``; ``embedding`` is W_Embed."""
        return self.logits(features, z, self.time_features(t)).softmax(dim=1) @ embedding


def backbone_passes(model: CTModel, solver: str, steps: int) -> Dict[str, int]:
    """The backbone passes a trial's record reports for a model integrated with ``solver`` over ``steps``:
    the image path once per train step and test batch; with the prototype embedding, ``z`` lives in image
    space and the label path is a backbone too, run at every evaluation of the network (two per Heun step)."""
    label = 1 if model.prototype else 0
    evaluations = steps * (2 if solver == "heun" else 1)
    return {"backbone_passes_per_train_step": 1 + label, "backbone_passes_per_test_batch": 1 + label * evaluations}


# -- inference settings ----------------------------------------------------------------------------

def parse_steps(text: str) -> List[int]:
    """``"2,5,10"`` or ``"[2,5,10]"`` (as the command line gives a list: its commas would otherwise separate
    parameters) -> ``[2, 5, 10]``; every entry a whole number of at least 1."""
    listed = str(text).strip()
    if listed.startswith("[") and listed.endswith("]"):
        listed = listed[1:-1]
    try:
        steps = [int(part) for part in listed.split(",") if part.strip()]
    except ValueError:
        steps = []
    if not steps or min(steps) < 1:
        raise UsageError(f"sweep_steps={text!r}: expected step counts of at least 1, in brackets on the command line, "
                         f"e.g. noprop_ct[sweep_steps=[2,5,10]]")
    return steps


def normalise_sweep_steps(params) -> None:
    """``sweep_steps`` as ``"2,5,10"`` however it was written, so one list is one trial identity."""
    params["sweep_steps"] = ",".join(map(str, parse_steps(params["sweep_steps"])))


def solver_setting(method, solvers, solver=None, steps=None):
    """``(solver, steps)`` for ``predict``: the method's parameters unless given, checked against ``solvers``."""
    solver = method.params["solver"] if solver is None else solver
    steps = method.params["steps"] if steps is None else steps
    if solver not in solvers:
        raise UsageError(f"method {method.name!r}: unknown solver {solver!r}; accepted: {', '.join(solvers)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UsageError(f"method {method.name!r}: steps={steps!r} must be a whole number of at least 1")
    return solver, steps


class IntegrationHooks:
    """The host hooks NoProp-CT and NoProp-FM share: what is compiled, the checkpoint setting
    (``eval_solver``/``eval_steps``), the ``--inference-sweep`` grid over ``sweep_solvers`` x ``sweep_steps``,
    and the z-ablation diagnostic. Mixed into a ``Method`` that sets ``sweep_solvers``."""

    sweep_solvers: Tuple[str, ...] = ()

    def compile_targets(self) -> List[str]:
        """Under ``--compile``: the train step and the per-step head the integration loop calls (compiling the
        whole loop would unroll up to 1000 steps and recompile for every step count)."""
        return ["train_step", "model.logits"]

    def capture_targets(self) -> List[str]:
        """Under ``--compile`` on CUDA: the whole integration loop, recorded as one CUDA graph per batch
        shape and setting and replayed, so 1000 steps cost one launch."""
        return ["integrate"]

    def checkpoint_setting(self) -> dict:
        """Settings for the evaluations during training: ``eval_solver`` at ``eval_steps`` (cheap by default)."""
        return {"solver": self.params["eval_solver"], "steps": self.params["eval_steps"]}

    def sweep_settings(self) -> List[dict]:
        """``--inference-sweep``: each of ``sweep_solvers`` at each of ``sweep_steps``."""
        return [{"solver": solver, "steps": steps}
                for solver in self.sweep_solvers for steps in parse_steps(self.params["sweep_steps"])]

    def diagnostic_settings(self) -> Dict[str, dict]:
        """Run once per trial: z-ablation (accuracy should drop to chance)."""
        return {"z_ablation": {"ablate_z": True}}
