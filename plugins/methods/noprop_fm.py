"""NoProp-FM: the flow-matching variant of NoProp (Li, Teh, Pascanu 2025, section 2.3)."""

from typing import Dict

import torch
from torch.nn import functional as F

from noprop_bench import Method, UsageError, hookimpl
from noprop_bench_plugins.parts.noprop import (EMBEDDINGS, CTModel, IntegrationHooks, backbone_passes,
                                              normalise_sweep_steps, solver_setting)
from noprop_bench_plugins.parts.noprop_dt_fm import label_embedding_for, require_non_negative, require_whole
from noprop_bench_plugins.parts.optim import optimizer_options

SOLVERS = ("euler", "heun")


class NoPropFM(IntegrationHooks, Method):
    """NoProp-FM: a velocity field ``v(z_t, x, t) = logits . W_Embed`` (no softmax) from N(0, I) to ``u_y``.

    Training (Algorithm 3), per batch with ``t ~ U(0,1)`` and ``z_0 ~ N(0, I)`` per example::

        z_t  = t u_y + (1 - t) z_0 (+ sigma eps)
        loss = mean ||v(z_t, x, t) - (u_y - z_0)||^2
             + CE(classifier(z_t + (1 - t) v), y)      the anchor, only with a learned W_Embed

    The network is NoProp-CT's (:class:`CTModel`, sharing its image, label and time paths), whose
    logits are used directly as weights on the rows of ``W_Embed``. Adam (L2 weight decay, as the
    paper's table) over every parameter; the backbone runs once per step.

    Inference integrates ``dz/dt = v(z, x, t)`` from ``z_0 ~ N(0, I)`` over ``steps`` uniform intervals
    of [0, 1] (``euler`` or ``heun``; the backbone runs once per test batch) and predicts the class
    whose embedding is nearest to ``z_1``: the logits are ``-||z_1 - u_c||^2``.

    Choices the paper leaves open (section 7), all parameters:

    * ``sigma=0``: the path is the straight line between ``z_0`` and ``u_y`` (the paper's sigma is not
      given; 0 is plain rectified-flow matching, whose Euler steps are exact on a straight field).
    * ``solver=euler, steps=1000``: the paper's T = 1000 with the simplest integrator; ``eval_solver=euler,
      eval_steps=20`` for the evaluations during training (``checkpoint_setting``).
    * The anchor cross-entropy applies to both learned embeddings, ``learned`` and ``prototype``
      (prototypes are learned after their medoid start); one-hot has no anchor and no classifier.
    * ``time_dim=64`` sinusoidal time embedding; constant learning rate; no gradient clipping.
    """

    name = "noprop_fm"
    label = "NoProp-FM"
    family = "continuous-time"
    stochastic = True
    defaults = {
        "embedding": "one-hot", "dim": 20, "lr": 1e-3, "weight_decay": 1e-3, "sigma": 0.0,
        "solver": "euler", "steps": 1000, "eval_solver": "euler", "eval_steps": 20,
        "sweep_steps": "2,5,10,20,40,100,1000", "time_dim": 64,
    }
    choices = {"embedding": EMBEDDINGS, "solver": SOLVERS, "eval_solver": SOLVERS}
    sweep_solvers = SOLVERS

    @classmethod
    def check_params(cls, params):
        super().check_params(params)
        require_whole(cls.name, params, ("dim", "steps", "eval_steps"))
        require_whole(cls.name, params, ("time_dim",), minimum=2)
        if params["time_dim"] % 2:
            raise UsageError(f"method {cls.name!r}: time_dim={params['time_dim']!r} must be an even number >= 2")
        require_non_negative(cls.name, params, ("lr", "weight_decay", "sigma"))
        normalise_sweep_steps(params)

    def __init__(self, task, **params):
        super().__init__(task, **params)
        type(self).check_params(self.params)
        p = self.params
        self.embedding = label_embedding_for(task, p["embedding"], p["dim"])
        prototype = p["embedding"] == "prototype"
        self.model = CTModel(task.make_backbone(), task.backbone_features, task.num_classes, self.embedding.dim,
                             time_dim=p["time_dim"], label_backbone=task.make_backbone() if prototype else None,
                             label_features=task.backbone_features, image_shape=task.image_shape)
        self.anchor = p["embedding"] != "one-hot"
        self.classifier = torch.nn.Linear(self.embedding.dim, task.num_classes) if self.anchor else None
        self.to(task.device)
        self.optimizer = torch.optim.Adam(self.parameters(), lr=p["lr"], weight_decay=p["weight_decay"],
                                          **optimizer_options(task.device))

    # -- training ---------------------------------------------------------------------------------
    def velocity(self, features: torch.Tensor, z: torch.Tensor, time_features: torch.Tensor) -> torch.Tensor:
        """``v = logits . W_Embed``: the logits weight the class embeddings directly, no softmax."""
        return self.model.logits(features, z, time_features) @ self.embedding.weight

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The flow-matching loss and, with a learned embedding, the anchor cross-entropy."""
        u_y = self.embedding.weight[y]
        features = self.model.features(x)
        t = torch.rand(len(y), device=x.device)
        z_0 = torch.randn_like(u_y)
        tt = t.unsqueeze(1)
        z_t = tt * u_y + (1 - tt) * z_0
        if self.params["sigma"]:
            z_t = z_t + self.params["sigma"] * torch.randn_like(u_y)
        v = self.velocity(features, z_t, self.model.time_features(t))
        flow = (v - (u_y - z_0)).pow(2).sum(dim=1).mean()
        terms = {"flow": flow}
        if self.anchor:
            terms["anchor"] = F.cross_entropy(self.classifier(z_t + (1 - tt) * v), y)
        terms["loss"] = sum(terms.values())
        return terms

    def train_step(self, x, y):
        terms = self.losses(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        self.optimizer.step()
        return {key: value.detach() for key, value in terms.items()}

    def capture_step_targets(self):
        return ["train_step"]

    # -- inference --------------------------------------------------------------------------------
    def integrate(self, features: torch.Tensor, solver: str, steps: int) -> torch.Tensor:
        """``z_1`` from ``z_0 ~ N(0, I)`` on ``steps`` uniform intervals of [0, 1]."""
        grid = torch.linspace(0.0, 1.0, steps + 1, device=features.device)
        times = self.model.time_features(grid)  # one row per grid point, broadcast over the batch
        z = torch.randn(features.shape[0], self.embedding.dim, device=features.device)
        h = 1.0 / steps
        for k in range(steps):
            f0 = self.velocity(features, z, times[k:k + 1])
            if solver == "euler":
                z = z + h * f0
            else:
                z = z + 0.5 * h * (f0 + self.velocity(features, z + h * f0, times[k + 1:k + 2]))
        return z

    def predict(self, x, solver=None, steps=None, ablate_z=False):
        """``-||z_1 - u_c||^2`` per class c, so the argmax is the nearest class embedding.

        ``solver`` (euler | heun) and ``steps`` default to the method's parameters. ``ablate_z=True``
        replaces ``z_1`` by fresh ``N(0, I)`` noise (a diagnostic: accuracy should drop to chance).
        """
        return self.predict_from_features(self.features(x), solver, steps, ablate_z)

    def features(self, x):
        """The backbone's contribution to the velocity field, shared by every inference setting."""
        return self.model.features(x)

    def predict_from_features(self, features, solver=None, steps=None, ablate_z=False):
        solver, steps = solver_setting(self, SOLVERS, solver, steps)
        if ablate_z:
            z = torch.randn(features.shape[0], self.embedding.dim, device=features.device)
        else:
            z = self.integrate(features, solver, steps)
        return -torch.cdist(z, self.embedding.weight).pow(2)

    # -- host hooks (the rest come from IntegrationHooks) -----------------------------------------
    def trial_metrics(self):
        evaluations = self.params["steps"] * (2 if self.params["solver"] == "heun" else 1)
        return {"anchor": self.anchor, "sigma": self.params["sigma"],
                "velocity_evaluations_per_test_batch": evaluations,
                **backbone_passes(self.model, self.params["solver"], self.params["steps"])}


@hookimpl
def register_methods(register):
    register(NoPropFM)
