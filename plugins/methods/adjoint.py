"""Adjoint sensitivity baseline (paper section 6): a neural ODE on the label latent, trained through torchdiffeq."""

from typing import Any, Dict, List

import torch
from torch import nn
from torch.nn import functional as F

from noprop_bench import Method, UsageError, hookimpl
from noprop_bench_plugins.parts.ode import LatentDynamics, SolverSettings, solve, solver_failures
from noprop_bench_plugins.parts.noprop import CTModel
from noprop_bench_plugins.parts.optim import optimizer_options

Z0 = ("noise", "zeros")


class NFETrace:
    """Function evaluations per training step, forward and backward, as window means along training.

    Each entry covers ``window`` consecutive steps and ends at ``step``. When ``capacity`` entries are
    filled, neighbours are merged and the window doubles, so a long run keeps a bounded, evenly
    spaced record whose steps can be matched to the trial's ``curve``.
    """

    def __init__(self, window: int = 10, capacity: int = 128):
        self.window, self.capacity = window, capacity
        self.entries: List[Dict[str, float]] = []
        self.steps = 0
        self.totals = [0, 0]
        self._read_at = (0, 0, 0)  # steps and totals at the last since_last_read()
        self.last = (0, 0)
        self._open = [0, 0, 0]  # steps, forward, backward in the window being filled

    def add(self, forward: int, backward: int):
        self.steps += 1
        self.totals[0] += forward
        self.totals[1] += backward
        self.last = (forward, backward)
        self._open = [self._open[0] + 1, self._open[1] + forward, self._open[2] + backward]
        if self._open[0] == self.window:
            n, f, b = self._open
            self.entries.append({"step": self.steps, "steps": n, "nfe_forward": f / n, "nfe_backward": b / n})
            self._open = [0, 0, 0]
            if len(self.entries) >= self.capacity:
                self._merge()

    def _merge(self):
        merged = []
        for a, b in zip(self.entries[0::2], self.entries[1::2]):
            n = a["steps"] + b["steps"]
            merged.append({"step": b["step"], "steps": n,
                           "nfe_forward": (a["nfe_forward"] * a["steps"] + b["nfe_forward"] * b["steps"]) / n,
                           "nfe_backward": (a["nfe_backward"] * a["steps"] + b["nfe_backward"] * b["steps"]) / n})
        self.entries = merged
        self.window *= 2

    def since_last_read(self) -> Dict[str, Any]:
        """Mean forward/backward evaluations per training step since the previous call."""
        steps, forward, backward = self._read_at
        self._read_at = (self.steps, self.totals[0], self.totals[1])
        n = self.steps - steps
        if n == 0:
            return {}
        return {"nfe_forward": (self.totals[0] - forward) / n, "nfe_backward": (self.totals[1] - backward) / n}

    def summary(self) -> Dict[str, Any]:
        steps = max(self.steps, 1)
        return {"nfe_forward_mean": self.totals[0] / steps, "nfe_backward_mean": self.totals[1] / steps,
                "nfe_forward_last": self.last[0], "nfe_backward_last": self.last[1],
                "nfe_steps_counted": self.steps, "nfe_trace": list(self.entries)}


class Adjoint(Method):
    """Neural ODE ``dz/dt = f(z, x, t)`` on the label latent, ``z_0 ~ N(0, I)``, linear classifier on ``z_1``.

    ``f`` is the NoProp-CT model of Figure 6 (run's backbone -> image path, FC label path, sinusoidal
    time path, fusion head); its ``num_classes`` logits are used directly as the velocity of the
    one-hot-sized latent. The image features are computed once per batch and enter the dynamics
    as a constant input. Cross-entropy on ``classifier(z_1)``; AdamW (lr 1e-3, weight decay 1e-3) as
    the paper. Gradients by ``torchdiffeq.odeint_adjoint`` (``adjoint=true``) or, as a control, by
    back-propagating through the same solver (``adjoint=false``). Training and inference use the
    same solver settings, as the paper fixes T for both.

    Defaults the paper leaves open (it says T = 1000 for training and inference, and nothing of the solver):

    * ``solver=rk4, steps=5``: 20 evaluations forward and 20 backward per training step, about 1.5x
      a backprop step on a 2-core CPU, so a one-to-two-minute budget gives a few epochs of mnist5k;
      at T = 1000 the same budget would allow well under a hundred steps. The paper's setting is
      ``adjoint[solver=euler,steps=1000]`` (1000 evaluations per solve, as NoProp-CT's 1000
      inference steps). Adaptive: ``solver=dopri5`` with ``rtol=1e-3, atol=1e-4``, the seminorm on
      the adjoint pass (``seminorm=false`` turns it off).
    * ``time_scale=1``: the 64-dim sinusoidal time embedding of NoProp-CT, but of ``t`` itself, so
      ``f`` is smooth in ``t``; NoProp-CT's ``t * 1000`` (``time_scale=1000``) makes ``f`` oscillate
      within one step of a coarse grid: an adaptive solver then crawls, and at ``rk4, steps=10`` the
      adjoint gradient differed from direct backprop by 4% (0.15% with ``time_scale=1``) on a test model.
    * ``z0=noise`` (``zeros`` makes the model deterministic).
    * ``max_nfe=20000`` evaluations per solve and direction; beyond that the trial fails (no hang).
    """

    name = "adjoint"
    label = "Adjoint"
    family = "continuous-time"
    stochastic = True  # z_0 ~ N(0, I) at inference
    defaults = {
        "embedding": "one-hot", "lr": 1e-3, "weight_decay": 1e-3, "adjoint": True,
        "solver": "rk4", "steps": 5, "rtol": 1e-3, "atol": 1e-4, "seminorm": True, "max_nfe": 20000,
        "z0": "noise", "time_dim": 64, "time_scale": 1.0,
    }
    choices = {"z0": Z0}

    @classmethod
    def settings(cls, params) -> SolverSettings:
        return SolverSettings(solver=params["solver"], steps=params["steps"], rtol=params["rtol"],
                              atol=params["atol"], seminorm=params["seminorm"], max_nfe=params["max_nfe"])

    @classmethod
    def check_params(cls, params):
        if params["embedding"] != "one-hot":
            raise UsageError(f"method {cls.name!r}: embedding={params['embedding']!r} is not supported; the adjoint "
                             f"baseline is one-hot only, as in the paper (accepted: one-hot)")
        super().check_params(params)
        cls.settings(params).check(cls.name)
        if int(params["time_dim"]) < 2 or int(params["time_dim"]) % 2:
            raise UsageError(f"method {cls.name!r}: time_dim={params['time_dim']!r} must be an even number >= 2")
        if not params["time_scale"] > 0:
            raise UsageError(f"method {cls.name!r}: time_scale={params['time_scale']!r} must be > 0")
        for key in ("lr", "weight_decay"):
            if params[key] < 0:
                raise UsageError(f"method {cls.name!r}: {key}={params[key]!r} must be >= 0")

    def __init__(self, task, **params):
        super().__init__(task, **params)
        type(self).check_params(self.params)
        p = self.params
        self.solver_settings = self.settings(p)
        self.model = CTModel(task.make_backbone(), task.backbone_features, task.num_classes, task.num_classes,
                             time_dim=p["time_dim"])
        self.classifier = nn.Linear(task.num_classes, task.num_classes)
        self.dynamics = LatentDynamics(self.model, p["time_scale"])
        self.nfe = NFETrace()
        self.to(task.device)
        self.optimizer = torch.optim.AdamW(self.parameters(), lr=p["lr"], weight_decay=p["weight_decay"],
                                           **optimizer_options(task.device))

    def z0(self, n: int, device) -> torch.Tensor:
        shape = (n, self.task.num_classes)
        return torch.randn(shape, device=device) if self.params["z0"] == "noise" else torch.zeros(shape, device=device)

    def forward(self, x: torch.Tensor, settings: SolverSettings = None, adjoint: bool = False) -> torch.Tensor:
        """Logits for ``x``: backbone once, then the ODE from ``z_0`` to ``z_1``, then the classifier."""
        return self._solve_from(self.model.features(x), settings or self.solver_settings, adjoint)

    def _solve_from(self, features: torch.Tensor, settings: SolverSettings, adjoint: bool = False) -> torch.Tensor:
        self.dynamics.bind(features)
        z1 = solve(self.dynamics, self.z0(features.shape[0], features.device), settings, adjoint)
        return self.classifier(z1)

    def train_step(self, x, y):
        self.dynamics.reset_counts()
        with solver_failures(self.params["solver"]):
            loss = F.cross_entropy(self(x, adjoint=self.params["adjoint"]), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.dynamics.bind(None)  # drop the batch's graph
        self.optimizer.step()
        self.nfe.add(self.dynamics.nfe_forward, self.dynamics.nfe_backward)
        return {"loss": loss.detach()}

    def predict(self, x, solver=None, steps=None):
        """Logits; ``solver``/``steps`` override the trained setting (e.g. for a sweep)."""
        return self.predict_from_features(self.features(x), solver, steps)

    def features(self, x):
        """The backbone's features that condition the dynamics, shared by every solver setting."""
        return self.model.features(x)

    def predict_from_features(self, features, solver=None, steps=None):
        settings = self.solver_settings
        if solver is not None or steps is not None:
            settings = SolverSettings(**{**settings.__dict__, "solver": solver or settings.solver,
                                         "steps": steps or settings.steps}).check(self.name)
        return self._solve_from(features, settings)

    def sweep_settings(self) -> List[dict]:
        """``--inference-sweep``: Euler and RK4 at a few step counts, up to 1000 evaluations (the paper's T)."""
        return ([{"solver": "euler", "steps": steps} for steps in (2, 5, 10, 20, 100, 1000)]
                + [{"solver": "rk4", "steps": steps} for steps in (2, 5, 10, 25, 250)])

    def curve_metrics(self) -> Dict[str, Any]:
        """Function evaluations per training step since the previous curve point."""
        return self.nfe.since_last_read()

    def trial_metrics(self) -> Dict[str, Any]:
        s = self.solver_settings
        return {"solver": s.solver, "steps": s.steps if not s.adaptive else None,
                "rtol": s.rtol if s.adaptive else None, "atol": s.atol if s.adaptive else None,
                "gradients": "adjoint" if self.params["adjoint"] else "direct", **self.nfe.summary()}


@hookimpl
def register_methods(register):
    register(Adjoint)
