"""The paper's back-propagation baseline (Li, Teh, Pascanu 2025, section 4): NoProp-DT's blocks trained end to end."""

import math

import torch
from torch import nn
from torch.nn import functional as F

from noprop_bench import Method, UsageError, hookimpl
from noprop_bench_plugins.parts.noprop import EMBEDDINGS
from noprop_bench_plugins.parts.noprop_dt_block import dt_chain
from noprop_bench_plugins.parts.noprop_dt_fm import require_non_negative, require_whole
from noprop_bench_plugins.parts.optim import optimizer_options


class BackpropDT(Method):
    """T blocks of NoProp-DT's architecture chained into one network, trained with back-propagation.

    Forward pass (the paper's discrete-time baseline)::

        z_0 ~ N(0, I)
        z_t = (1 - a_t) z_{t-1} + a_t u_t(z_{t-1}, x),   a_t = tanh(w_t), w_t learnable, t = 1..T
        logits = classifier(z_T)

    ``u_t`` is a :class:`DTBlock` (``softmax(logits_t) . W_Embed``, each block with its own image path)
    and the classifier a linear layer, exactly as in NoProp-DT. One cross-entropy on the logits trains
    every block, the mixing weights ``w_t``, the classifier and a learned ``W_Embed`` together with one
    AdamW (the paper's lr 1e-3, weight decay 1e-3); the whole chain's activations are kept for the
    backward pass, so its memory is the end-to-end model's. Inference is the same chain in eval mode;
    it samples ``z_0``, so it is stochastic and the final evaluation is repeated.

    Choice the paper leaves open: the initial mixing weight, ``mix_init=0.5`` (``a_t = tanh(w_t)``
    starts at 0.5 for every block).
    """

    name = "backprop_dt"
    label = "Backprop"
    family = "discrete-time"
    stochastic = True
    defaults = {"embedding": "one-hot", "dim": 20, "blocks": 10, "lr": 1e-3, "weight_decay": 1e-3,
                "mix_init": 0.5}
    choices = {"embedding": EMBEDDINGS}

    @classmethod
    def check_params(cls, params):
        super().check_params(params)
        require_whole(cls.name, params, ("dim", "blocks"))
        require_non_negative(cls.name, params, ("lr", "weight_decay"))
        if not -1.0 < params["mix_init"] < 1.0:
            raise UsageError(f"method {cls.name!r}: mix_init={params['mix_init']!r} must lie in (-1, 1): "
                             "it is tanh(w_t) at the start")

    def __init__(self, task, **params):
        super().__init__(task, **params)
        type(self).check_params(self.params)
        p = self.params
        self.T = p["blocks"]
        self.embedding, self.blocks = dt_chain(task, p)
        self.mix_weights = nn.Parameter(torch.full((self.T,), math.atanh(p["mix_init"])))
        self.classifier = nn.Linear(self.embedding.dim, task.num_classes)
        self.to(task.device)
        self.optimizer = torch.optim.AdamW(self.parameters(), lr=p["lr"], weight_decay=p["weight_decay"],
                                           **optimizer_options(task.device))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Every block's image path ``[B, T, width]``: independent of ``z``."""
        return torch.stack([block.features(x) for block in self.blocks], dim=1)

    def predict_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """The chain from ``z_0 ~ N(0, I)`` to the classifier's logits on ``z_T``."""
        W = self.embedding.weight
        z = torch.randn(features.shape[0], W.shape[1], device=features.device)
        mix = torch.tanh(self.mix_weights)
        for t, block in enumerate(self.blocks):
            z = (1 - mix[t]) * z + mix[t] * block(features[:, t], z, W)
        return self.classifier(z)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.predict_from_features(self.features(x))

    def train_step(self, x, y):
        loss = F.cross_entropy(self.predict(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.detach()}

    def capture_step_targets(self):
        return ["train_step"]

    def trial_metrics(self):
        return {
            "blocks": self.T, "mix": [float(v) for v in torch.tanh(self.mix_weights.detach())],
            "parameters_per_block": sum(p.numel() for p in self.blocks[0].parameters()),
            "backbone_passes_per_train_step": self.T * (2 if self.params["embedding"] == "prototype" else 1),
            "memory_note": "end to end: all blocks' activations are kept for one backward pass",
        }


@hookimpl
def register_methods(register):
    register(BackpropDT)
