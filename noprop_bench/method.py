"""The contract a method plugin implements."""

import json
import math
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import nn

from .errors import UsageError

FAMILIES = ("discrete-time", "continuous-time")


def coerce_value(key: str, text: str, default: Any) -> Any:
    """Convert a command-line string to the type of the parameter's default. A list or tuple default takes a
    list in brackets, ``[16,8]`` (commas outside brackets separate parameters), each item converted to the type
    of the default's first item (text when the default is empty)."""
    if isinstance(default, (list, tuple)):
        listed = text.strip()
        if not (listed.startswith("[") and listed.endswith("]")):
            raise UsageError(f"parameter {key}={text!r}: expected a list in brackets, as its default "
                             f"{list(default)!r}, e.g. {key}=[{','.join(map(str, default)) or 'a,b'}]")
        items = [item.strip() for item in listed[1:-1].split(",") if item.strip()]
        values = [coerce_value(f"{key} item", item, default[0]) if default else item for item in items]
        return type(default)(values)
    try:
        if isinstance(default, bool):
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if isinstance(default, int):
            value = int(text)
        elif isinstance(default, float):
            value = float(text)
        else:
            return text
    except ValueError:
        kind = ("true/false" if isinstance(default, bool) else "a whole number (int)" if isinstance(default, int)
                else type(default).__name__)
        hint = ""
        whole = _whole(text)
        if isinstance(default, int) and not isinstance(default, bool) and whole is not None and _fits(whole):
            hint = f"; write {whole}"
        raise UsageError(f"parameter {key}={text!r}: expected {kind}, as its default {default!r}{hint}") from None
    # NaN or inf would only fail (or diverge) once training had begun; a default that is itself not finite
    # (inf meaning "no limit", say) allows them
    if isinstance(value, float) and not math.isfinite(value) and math.isfinite(default):
        raise UsageError(f"parameter {key}={text}: must be a finite number")
    if isinstance(value, int) and not _fits(value):  # beyond what a tensor or a C loop holds
        raise UsageError(f"parameter {key}={text}: beyond 64 bits (from -2**63 to 2**63 - 1)")
    return value


def _fits(value: int) -> bool:
    """Whether a whole number fits a signed 64-bit integer."""
    return -2 ** 63 <= value < 2 ** 63


def _whole(text: str) -> Optional[int]:
    """``1e3`` -> 1000: a whole number written as a float; else None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value.is_integer() else None


def reject_unknown_names(given: Mapping[str, Any], defaults: Mapping[str, Any], owner: str, noun: str) -> None:
    """A :class:`UsageError` listing what is accepted when ``given`` names a key ``defaults`` lacks."""
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        accepted = ", ".join(sorted(defaults)) or "none"
        raise UsageError(f"{owner} has no {noun} {', '.join(unknown)}; accepted: {accepted}")


class Method(nn.Module):
    """A way of training a classifier, compared by the harness under a shared budget.

    Subclasses set ``name`` (CLI name), ``label`` (table row), ``family`` (``"discrete-time"`` or
    ``"continuous-time"``) and ``defaults`` (every accepted parameter with its default value; values
    given as ``name[key=value]`` are converted to the default's type), build their modules in
    ``__init__(task, **params)`` after calling ``super().__init__(task, **params)``, and implement
    ``train_step`` and ``predict``. Set ``stochastic = True`` when ``predict`` samples, so the final
    evaluation is repeated ``--inference-runs`` times.
    """

    name: str = ""
    label: str = ""
    family: str = "discrete-time"
    defaults: Dict[str, Any] = {}
    choices: Dict[str, tuple] = {}
    stochastic: bool = False

    def __init__(self, task, **params):
        super().__init__()
        self.task = task
        self.params = {**self.defaults, **params}

    # -- the contract -------------------------------------------------------------------------
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        """One update on a batch of normalised images ``x`` and labels ``y``; returns metrics.

        Return tensors, not Python numbers, so no device synchronisation is forced; include
        ``"loss"`` so the harness can detect divergence.
        """
        raise NotImplementedError

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (or scores) ``[B, num_classes]``; called under ``torch.inference_mode()``."""
        raise NotImplementedError

    # -- optional: evaluation reuses what does not depend on the inference setting -----------------
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The deterministic, setting-independent part of ``predict`` (e.g. the backbone), if the method
        splits it out: then ``predict(x, **s)`` must equal ``predict_from_features(features(x), **s)`` and
        the harness computes features once per test image for all final evaluations, sweep points and
        diagnostics of a trial. Methods that do not override both leave ``predict`` whole."""
        raise NotImplementedError

    def predict_from_features(self, features: torch.Tensor, **setting) -> torch.Tensor:
        """``predict`` given ``features(x)``; see :meth:`features`."""
        raise NotImplementedError

    def reuses_features(self) -> bool:
        """Whether the method splits out :meth:`features` (see there)."""
        return splits_features(type(self))

    def compile_targets(self) -> List[str]:
        """Attribute paths ``torch.compile`` wraps under ``--compile`` (dotted for submodules' methods, e.g.
        ``"model.logits"``); by default the train step and the inference path. Return ``[]`` to stay eager."""
        return ["train_step", "predict_from_features" if self.reuses_features() else "predict"]

    def capture_targets(self) -> List[str]:
        """Attribute paths whose whole inference call is recorded once as a CUDA graph and replayed, under
        ``--compile`` on CUDA (e.g. an integration loop of many small steps; see ``run.cuda_graphs``).
        What they compute must depend only on their arguments, the method's parameters and buffers, and
        the random generator, and must not synchronise with the host. Default: none."""
        return []

    def capture_step_targets(self) -> List[str]:
        """Attribute paths of functions that each make one whole training update (forward, backward and
        optimiser step, e.g. ``train_step``), recorded once per call signature as a CUDA graph and replayed,
        under ``--compile`` on CUDA. Besides what ``capture_targets`` asks, they must change no Python state
        (counters, a block chosen in Python) that a later update reads, since a replay runs none of the
        Python: leave such work in ``train_step`` around the captured call. Keep the same optimiser objects
        for the whole trial. A learning rate changed between steps is seen and costs a new recording, so
        leave a method with a schedule that changes it every step out. Default: none."""
        return []

    def warm_up_calls(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Untimed calls the harness makes after its warm-up train steps on ``(x, y)``, before the clock
        starts, when it records some of the method's calls as CUDA graphs (under ``--compile`` on CUDA): for
        code paths those steps do not reach (NoProp-DT's other blocks), so that recording them is not
        charged to the budget. The harness puts the method back afterwards, as after every warm-up step.
        Default: none."""

    def trial_metrics(self) -> Dict[str, Any]:
        """Extra JSON-serialisable numbers to store with the trial (e.g. function evaluations). A
        ``"warnings"`` entry (a list of texts) is printed when the trial ends and listed under Table 1."""
        return {}

    def curve_metrics(self) -> Dict[str, Any]:
        """JSON-serialisable numbers stored with each point of the accuracy curve (e.g. recent NFE)."""
        return {}

    # -- optional inference settings (keyword arguments of ``predict``) ----------------------------
    def checkpoint_setting(self) -> Dict[str, Any]:
        """``predict`` keyword arguments for the evaluations during training (e.g. a cheap solver)."""
        return {}

    def sweep_settings(self) -> List[Dict[str, Any]]:
        """Settings evaluated after training with ``--inference-sweep`` (e.g. solvers x step counts)."""
        return []

    def diagnostic_settings(self) -> Dict[str, Dict[str, Any]]:
        """Named settings evaluated once after every trial, e.g. ``{"z_ablation": {"ablate_z": True}}``."""
        return {}

    # -- parameters -----------------------------------------------------------------------------
    @classmethod
    def resolve_params(cls, given: Mapping[str, str]) -> Dict[str, Any]:
        """Merge command-line strings into ``defaults``, converting types and checking names."""
        reject_unknown_names(given, cls.defaults, f"method {cls.name!r}", "parameter")
        params = dict(cls.defaults)
        for key, value in given.items():
            params[key] = coerce_value(key, value, cls.defaults[key]) if isinstance(value, str) else value
        cls.check_params(params)
        return params

    @classmethod
    def check_params(cls, params: Dict[str, Any]) -> None:
        """Reject invalid values with a :class:`UsageError`; by default checks ``choices``."""
        for key, allowed in cls.choices.items():
            if params.get(key) not in allowed:
                raise UsageError(
                    f"method {cls.name!r}: {key}={params.get(key)!r} is not one of {', '.join(map(str, allowed))}"
                )

    @classmethod
    def row_label(cls, params: Mapping[str, Any]) -> str:
        """The Table 1 row label, ``Label (embedding)`` as the paper writes it; just ``Label`` for a method
        without an ``embedding`` parameter."""
        if "embedding" not in params and "embedding" not in cls.defaults:
            return cls.label or cls.name
        embedding = params.get("embedding", "one-hot")
        if embedding == "learned":
            embedding = f"dim={params.get('dim', 20)}"
        return f"{cls.label or cls.name} ({embedding})"


def settings_suffix(params: Mapping[str, Any], defaults: Mapping[str, Any]) -> str:
    """`` [steps=20]``: each parameter of ``params`` that differs from ``defaults``, or "" when none does, by
    name (as records store them, so a progress line and a table label a trial alike). The embedding (and a
    learned embedding's ``dim``) is left out: the row label names it already. A list is written as the command
    line takes it, in brackets (``sweep_steps=[2,5]``)."""
    in_label = {"embedding"} | ({"dim"} if params.get("embedding") == "learned" else set())
    differing = [f"{key}={as_given(value)}" for key, value in sorted(params.items())
                 if key not in in_label and key in defaults and _stored(value) != _stored(defaults[key])]
    return f" [{', '.join(differing)}]" if differing else ""


def as_given(value: Any) -> str:
    """A parameter's value as the command line takes it: a list (or a text list, sweep_steps) in brackets."""
    if isinstance(value, (list, tuple)):
        return f"[{','.join(map(str, value))}]"
    return f"[{value}]" if isinstance(value, str) and "," in value else str(value)


def _stored(value: Any) -> str:
    """A value as a trial record stores it, so a label reads the same before and after the round trip (a tuple
    and a list, or two NaNs, compare equal there); a whole number equals the same float."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    return json.dumps(value, sort_keys=True, default=str)


def row_label_with_settings(cls: type, params: Mapping[str, Any]) -> str:
    """``cls.row_label(params)`` followed by the parameters that differ from the method's defaults, as in
    ``NoProp-CT (one-hot) [steps=20]``: a progress line or a speed row never hides how a method was set up."""
    return cls.row_label(params) + settings_suffix(params, cls.defaults)


def splits_features(cls: type) -> bool:
    """Whether the :class:`Method` subclass ``cls`` overrides both :meth:`Method.features` and
    :meth:`Method.predict_from_features`, so the harness can cache its features."""
    return cls.features is not Method.features and cls.predict_from_features is not Method.predict_from_features
