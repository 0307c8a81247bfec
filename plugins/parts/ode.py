"""The neural ODE of the adjoint baseline: the vector field, its evaluation counters and the solve.

:class:`LatentDynamics` is ``dz/dt = f(z, x, t)`` built from a NoProp :class:`CTModel` head, with the
image features held as a constant input for one batch. :func:`solve` integrates it from t = 0 to 1
with torchdiffeq, either with gradients by the adjoint method (``odeint_adjoint``) or by direct
back-propagation through the solver's operations (``odeint``), with the same solver settings.
"""

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from noprop_bench import UsageError
from noprop_bench_plugins.parts.noprop import CTModel, sinusoidal_embedding

FIXED_SOLVERS = ("euler", "midpoint", "heun3", "rk4")
ADAPTIVE_SOLVERS = ("dopri5", "bosh3", "adaptive_heun", "dopri8", "fehlberg2")
SOLVERS = FIXED_SOLVERS + ADAPTIVE_SOLVERS


class SolverError(RuntimeError):
    """The ODE solver gave up (step-size underflow, too many evaluations); ends the trial as failed."""


@dataclass(frozen=True)
class SolverSettings:
    """How to integrate: a fixed-step ``solver`` on ``steps`` uniform intervals, or an adaptive one.

    ``rtol``/``atol`` and ``seminorm`` only matter for adaptive solvers, ``steps`` only for fixed-step
    ones. ``max_nfe`` bounds the function evaluations of one solve (forward or adjoint), so a stiff
    solve fails instead of running for hours.
    """

    solver: str = "rk4"
    steps: int = 5
    rtol: float = 1e-3
    atol: float = 1e-4
    seminorm: bool = True
    max_nfe: int = 20000

    @property
    def adaptive(self) -> bool:
        return self.solver in ADAPTIVE_SOLVERS

    def check(self, owner: str = "adjoint") -> "SolverSettings":
        """Raise a :class:`UsageError` naming what is accepted; returns ``self``."""
        if self.solver not in SOLVERS:
            raise UsageError(f"method {owner!r}: unknown solver {self.solver!r}; accepted: fixed-step "
                             f"{', '.join(FIXED_SOLVERS)} (with steps=N) or adaptive {', '.join(ADAPTIVE_SOLVERS)} "
                             f"(with rtol, atol)")
        for key in ("steps", "max_nfe"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"method {owner!r}: {key}={value!r} must be a whole number of at least 1")
        for key in ("rtol", "atol"):
            if not getattr(self, key) > 0:
                raise UsageError(f"method {owner!r}: {key}={getattr(self, key)!r} must be > 0")
        return self

    def options(self) -> dict:
        """torchdiffeq ``options`` for the forward solve."""
        if self.adaptive:
            return {"max_num_steps": self.max_nfe}
        steps = self.steps

        def uniform_grid(func, y0, t):
            # an explicit uniform grid (``step_size`` would round 1/steps and can add a sliver of a step),
            # built on the device from t's ends without reading them on the host; the ends come out exact
            fractions = torch.linspace(0.0, 1.0, steps + 1, dtype=t.dtype, device=t.device)
            return t[0] + (t[-1] - t[0]) * fractions

        return {"grid_constructor": uniform_grid}


class LatentDynamics:
    """``f(z, x, t)``: the CT model's head on (image features, z, time embedding), used as a vector field.

    Not an ``nn.Module``: it only borrows the modules of ``model``, so the owning method's parameter
    list and state dict stay as they are. Call :meth:`bind` with a batch's image features before
    solving. Counts its evaluations: ``nfe_forward`` (the forward solve) and ``nfe_backward`` (the
    adjoint solve, recognised as the calls made with gradients enabled while ``adjoint`` is set).
    """

    def __init__(self, model: CTModel, time_scale: float = 1.0):
        self.model = model
        self.time_scale = time_scale
        self.features: Optional[torch.Tensor] = None
        self.adjoint = False
        self.reset_counts()
        self.limit(0)
        _count_outside_compile()

    def reset_counts(self):
        self.nfe_forward = 0
        self.nfe_backward = 0

    def limit(self, max_nfe: int):
        """Allow ``max_nfe`` more evaluations in each direction from now on (0: no limit)."""
        self._limits = (self.nfe_forward + max_nfe, self.nfe_backward + max_nfe) if max_nfe else None
        self._max_nfe = max_nfe

    def bind(self, features: torch.Tensor) -> "LatentDynamics":
        self.features = features
        return self

    def parameters(self) -> Sequence[nn.Parameter]:
        """The parameters the vector field uses (the image path is outside it: its features are an input)."""
        m = self.model
        modules = (m.label_path, m.fuse_label, m.time_path, m.fuse_time, m.rest)
        return [p for module in modules for p in module.parameters() if p.requires_grad]

    def _count_evaluation(self, backward: bool) -> None:
        """Count one evaluation and hold it to the limit (run outside torch.compile: see
        :func:`_count_outside_compile`)."""
        if backward:
            self.nfe_backward += 1
        else:
            self.nfe_forward += 1
        if self._limits is not None and (self.nfe_backward if backward else self.nfe_forward) > self._limits[backward]:
            raise SolverError(f"more than max_nfe={self._max_nfe} function evaluations in one "
                              f"{'adjoint' if backward else 'forward'} solve (stiff dynamics for this solver: "
                              f"raise max_nfe or loosen rtol/atol)")

    def __call__(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        self._count_evaluation(self.adjoint and torch.is_grad_enabled())
        m = self.model
        time = m.fuse_time(m.time_path(sinusoidal_embedding(t.reshape(1), m.time_dim, self.time_scale)))
        return m.logits(self.features, z, time)


def _count_outside_compile() -> None:
    """Run :meth:`LatentDynamics._count_evaluation` outside torch.compile: traced, the counts would become
    guarded constants, and every solver step would compile its caller once more. Done when the first field is
    made, not with a decorator: that would import torch._dynamo (seconds) wherever this plugin is loaded."""
    if not getattr(LatentDynamics._count_evaluation, "outside_compile", False):
        LatentDynamics._count_evaluation = torch.compiler.disable(LatentDynamics._count_evaluation)
        LatentDynamics._count_evaluation.outside_compile = True


@contextmanager
def solver_failures(solver: str) -> Iterator[None]:
    """Re-raise torchdiffeq's ``AssertionError`` (e.g. "underflow in dt") as :class:`SolverError`.

    Wrap both the solve and the ``backward()`` call: the adjoint solve runs inside the latter.
    """
    try:
        yield
    except AssertionError as error:
        raise SolverError(f"{solver} solver failed: {error}") from error


def solve(dynamics: LatentDynamics, z0: torch.Tensor, settings: SolverSettings, adjoint: bool) -> torch.Tensor:
    """``z(1)`` from ``z(0) = z0`` under ``dynamics`` (already bound to the batch's features).

    With ``adjoint`` the backward pass solves the adjoint ODE backwards in time; the features are
    passed to torchdiffeq as adjoint parameters next to the field's own, so their gradient (and
    through it the backbone's) comes out of the adjoint solve like a parameter gradient. With
    ``seminorm`` the adaptive backward solve leaves those parameter-like integrals out of its error
    control (Kidger et al. 2021). Each direction may take at most ``settings.max_nfe`` evaluations.
    """
    from torchdiffeq import odeint, odeint_adjoint  # here: with scipy it costs every process a second to import

    t = torch.arange(2.0, dtype=z0.dtype, device=z0.device)  # [0, 1], made on the device: no host copy per solve
    tolerances = {"rtol": settings.rtol, "atol": settings.atol} if settings.adaptive else {}
    dynamics.adjoint = adjoint
    dynamics.limit(settings.max_nfe)
    with solver_failures(settings.solver):
        if not adjoint:
            return odeint(dynamics, z0, t, method=settings.solver, options=settings.options(), **tolerances)[-1]
        params = list(dynamics.parameters())
        if dynamics.features is not None and dynamics.features.requires_grad:
            params.append(dynamics.features)
        adjoint_options = settings.options()
        if settings.adaptive and settings.seminorm:
            adjoint_options["norm"] = "seminorm"
        return odeint_adjoint(dynamics, z0, t, method=settings.solver, options=settings.options(),
                              adjoint_options=adjoint_options, adjoint_params=params, **tolerances)[-1]
