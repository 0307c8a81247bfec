"""``check_method``: a method plugin run through the contract on tiny synthetic data."""

import copy
from collections import Counter
import json
import warnings
from typing import Any, Dict, Iterable, Iterator, List, Optional, Set, Tuple, Type

import torch

from ..conformance import (ContractViolation, built_method_fixes, build_method, describe_class, logits_fixes,
                           loss_fixes, step_metrics_fixes)
from ..errors import UsageError
from ..method import FAMILIES, Method
from .host_sync import HostSyncWarning, record_host_syncs
from .tiny import tiny_batch, tiny_task


def reachable_tensors(obj: Any, skip: Iterable[Any] = (), depth: int = 5,
                      seen: Optional[set] = None) -> Iterator[Tuple[str, torch.Tensor]]:
    """``(path, tensor)`` for every tensor an object holds: parameters, buffers, optimiser state and plain
    tensors kept in attributes, lists and dicts, a few levels deep; objects in ``skip`` are not entered."""
    seen = {id(item) for item in skip} if seen is None else seen
    if id(obj) in seen or depth < 0:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield "", obj
        return
    if isinstance(obj, dict):
        items = list(obj.items())
    elif isinstance(obj, (list, tuple)):
        items = list(enumerate(obj))
    elif isinstance(obj, (torch.nn.Module, torch.optim.Optimizer)) or (
            hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] not in ("torch", "builtins")):
        items = list(vars(obj).items())
    else:
        return
    for key, value in items:
        for path, tensor in reachable_tensors(value, skip, depth - 1, seen):
            yield f"{key}.{path}" if path else str(key), tensor


def _own_tensors(method: Method) -> Iterator[Tuple[str, torch.Tensor]]:
    """The tensors a method holds, leaving out the task it was handed (shared by design)."""
    task = getattr(method, "task", None)
    return reachable_tensors(method, skip=[task, *vars(task).values()] if task is not None else [])


def _state(method: Method) -> Dict[str, torch.Tensor]:
    return {path: tensor.detach().clone() for path, tensor in _own_tensors(method)}


def _predict(method: Method, x: torch.Tensor, seed: int, features: bool = False) -> torch.Tensor:
    method.eval()
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []), torch.inference_mode():
        torch.manual_seed(seed)
        logits = method.predict_from_features(method.features(x)) if features else method.predict(x)
    method.train()
    return logits


class _Findings:
    """Violations, each worded as its fix, reported together as one assertion per violation."""

    def __init__(self, cls: type):
        self.cls, self.fixes = cls, []

    def add(self, fixes: List[str]) -> None:
        self.fixes.extend(fixes)

    def check(self, ok: bool, fix: str) -> None:
        if not ok:
            self.fixes.append(fix)

    def raise_if_any(self) -> None:
        if self.fixes:
            lines = "\n".join(f"  - {fix}" for fix in self.fixes)
            raise AssertionError(f"{describe_class(self.cls)} breaks the method contract; to fix:\n{lines}")


def check_method(cls: Type[Method], device="cpu", **params) -> None:
    """Run ``cls`` through the method contract on tiny synthetic data; an ``AssertionError`` lists a fix
    for each violation, and a :class:`HostSyncWarning` names each host synchronisation in ``train_step``.

    ``params`` are the method's parameters as Python values (as ``defaults`` holds them); choose small
    ones (few steps, few blocks) so the check takes seconds. Plain tensors updated by hand are as good as
    ``nn.Parameter``\\ s.
    """
    findings = _Findings(cls)
    findings.check(bool(cls.name) and isinstance(cls.name, str), "set the class attribute name = 'my_method'")
    findings.check(cls.family in FAMILIES, f"set family to one of {', '.join(FAMILIES)}, not {cls.family!r}")
    untyped = sorted(key for key, value in getattr(cls, "defaults", {}).items() if value is None)
    findings.check(not untyped, f"give {', '.join(untyped)} a default of the type it takes (0, 0.0, '', False), "
                                f"not None: a value given as {cls.name or 'name'}[{(untyped or ['key'])[0]}=...] "
                                f"is converted to its default's type, and stays a string after None")
    defaults_before = copy.deepcopy(cls.defaults)
    resolved = _resolved_params(cls, params, findings)
    task = tiny_task(device)
    try:
        method = build_method(cls, task, resolved).to(task.device)
        twin = build_method(cls, task, resolved).to(task.device)
    except ContractViolation as error:
        findings.add([str(error).split(": ", 1)[1]])
        findings.raise_if_any()
    findings.add(built_method_fixes(method))
    findings.add(_device_fixes(method, task.device))
    findings.add(_shared_state_fixes(method, twin))
    x, y = tiny_batch(task)
    x_before, y_before = x.clone(), y.clone()
    twin_logits = _repeatable_logits(twin, x_before)
    twin_before = _state(twin)  # after its predictions: what predict keeps of its own (a counter) is not shared
    _check_train_step(method, x, y, findings)
    # what the twin holds, and what it predicts (on the batch as given: train_step may have changed x, which
    # is its own finding): state reached through the class or a module global is in no instance's
    # attributes, but shows in the twin's logits
    findings.check(_unchanged(twin_before, _state(twin))
                   and _same_or_unknown(twin_logits, _logits_or_none(twin, x_before)),
                   "two instances must share no state: training one changed the other (keep tensors, optimisers "
                   "and buffers per instance, never in class attributes or module globals)")
    findings.check(cls.defaults == defaults_before, "never modify the class's defaults; copy them (self.params)")
    state_before = _state(method)
    x_given = x.clone()
    logits = _predict(method, x, seed=1)
    after = _state(method)  # a tensor predict adds (a cache of its own) is no training; one it changes may be
    findings.check(all(_same(before, after[path]) for path, before in state_before.items() if path in after),
                   EVALUATION_TRAINS)
    findings.add(logits_fixes(logits, len(y), task.num_classes, task.device))
    if isinstance(logits, torch.Tensor) and torch.equal(x, x_given):  # else the fix below explains the rest
        varies = _determinism_fixes(cls, method, x, logits)
        findings.add(varies)
        if not varies:  # logits that vary with the draw vary with the batch too: no second cause to blame
            findings.add(_batch_independence_fixes(cls, method, x, logits))
        findings.add(_feature_split_fixes(method, x))
    findings.check(torch.equal(x, x_before) and torch.equal(y, y_before),
                   "never modify the input batch in place (x or y): clone it first")
    findings.raise_if_any()


def _logits_or_none(method: Method, x: torch.Tensor) -> Optional[torch.Tensor]:
    """``predict`` on a copy of ``x`` at a fixed seed; None when it raises or returns no tensor (what is wrong
    with it is found when the method under test predicts)."""
    try:
        logits = _predict(method, x.clone(), seed=1)
    except Exception:  # noqa: BLE001 - reported by the checks of the method itself
        return None
    return logits if isinstance(logits, torch.Tensor) else None


def _repeatable_logits(method: Method, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The logits of :func:`_logits_or_none` when a second call gives the same; else None."""
    first = _logits_or_none(method, x)
    return first if first is not None and _same_or_unknown(first, _logits_or_none(method, x)) else None


def _same_or_unknown(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    return a is None or b is None or _same(a, b)


def _resolved_params(cls: Type[Method], params: Dict[str, Any], findings: _Findings) -> Dict[str, Any]:
    try:
        resolved = cls.resolve_params(params)
    except UsageError as error:
        findings.add([f"parameters {params} must resolve against defaults (got: {error})"])
        findings.raise_if_any()
    try:
        json.dumps(resolved)
    except (TypeError, ValueError) as error:
        findings.add([f"resolved parameters must be plain JSON values (numbers, strings, booleans, lists): {error}"])
    return resolved


def _check_train_step(method: Method, x: torch.Tensor, y: torch.Tensor, findings: _Findings) -> None:
    """One training step: a dict of tensors with a finite scalar loss, and no host synchronisation."""
    cls = type(method)
    method.train()
    with record_host_syncs(method.task.device, _own_packages(cls)) as syncs:
        metrics = method.train_step(x, y)
    findings.add(step_metrics_fixes(metrics))
    if isinstance(metrics, dict):
        loss = metrics.get("loss")
        findings.check(loss is not None, "return the training loss as metrics['loss'] so divergence can be seen")
        findings.add(loss_fixes(metrics))
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            findings.check(bool(torch.isfinite(loss.detach()).all()),
                           "train_step's loss must be finite on a tiny batch")
    for sync, count in sorted(Counter(syncs).items()):
        warnings.warn(f"{describe_class(cls)}: train_step forces a host synchronisation ({count}x): {sync}; keep "
                      f"Python numbers out of the step and return tensors", HostSyncWarning, stacklevel=3)


EVAL_MODE_FIX = ("register every module (nn.ModuleList or an attribute, not a Python list or dict) so "
                 "method.eval() reaches it, never call train() in predict, and pass training=self.training to "
                 "F.dropout and F.batch_norm")
EVALUATION_TRAINS = ("predict changed the method's state (a BatchNorm's running statistics, say): evaluation must "
                     f"not train; {EVAL_MODE_FIX}")


def _batch_independence_fixes(cls: Type[Method], method: Method, x: torch.Tensor, logits: torch.Tensor) -> List[str]:
    """A deterministic method's logits for an image must not depend on the other images of its batch: the
    harness evaluates in batches of its own choosing."""
    if cls.stochastic or len(x) < 2:
        return []
    part = _predict(method, x[: len(x) // 2], seed=1)
    if isinstance(part, torch.Tensor) and part.shape == logits[: len(x) // 2].shape and not torch.allclose(
            part, logits[: len(x) // 2], rtol=1e-4, atol=1e-5, equal_nan=True):
        return [f"predict's logits for an image depend on the other images in its batch (a BatchNorm or dropout "
                f"still in training mode): {EVAL_MODE_FIX}"]
    return []


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, a NaN equal to a NaN in the same place (a schedule may hold NaN where undefined)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point() or a.is_complex():
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return torch.equal(a, b)


def _unchanged(before: Dict[str, torch.Tensor], after: Dict[str, torch.Tensor]) -> bool:
    return before.keys() == after.keys() and all(_same(before[k], after[k]) for k in before)


def _device_fixes(method: Method, device: torch.device) -> List[str]:
    elsewhere = sorted(path for path, tensor in _own_tensors(method) if tensor.device.type != device.type)
    if elsewhere:
        return [f"move every parameter and tensor to task.device ({device}) in __init__ "
                f"(e.g. self.to(task.device)); on another device: {', '.join(elsewhere[:5])}"]
    return []


def _shared_state_fixes(method: Method, twin: Method) -> List[str]:
    def storages(m):
        return {t.untyped_storage().data_ptr(): p for p, t in _own_tensors(m) if t.numel() > 0}

    shared = sorted(set(storages(method)) & set(storages(twin)))
    if shared:
        names = sorted(storages(method)[pointer] for pointer in shared)
        return [f"two instances must share no state: create tensors in __init__, not at class or module level "
                f"(shared: {', '.join(names[:5])})"]
    return []


def _own_packages(cls: type) -> Set[str]:
    """The top-level packages of a method class and its bases, the host's and torch's excepted."""
    return {base.__module__.partition(".")[0] for base in cls.__mro__
            if base.__module__.partition(".")[0] not in ("builtins", "torch", "noprop_bench")}


def _determinism_fixes(cls: Type[Method], method: Method, x: torch.Tensor, seed_1: torch.Tensor) -> List[str]:
    same = _same(seed_1, _predict(method, x, seed=1))
    other_seed = _same(seed_1, _predict(method, x, seed=2))
    if not same:
        return ["predict must give the same logits for the same torch seed: draw randomness from torch's "
                "generator (torch.randn, not numpy or random)"]
    if cls.stochastic and other_seed:
        return ["predict does not vary with the seed: set stochastic = False, so the final evaluation is not "
                "repeated for nothing"]
    if not cls.stochastic and not other_seed:
        return ["predict varies with the seed: set stochastic = True, so the final evaluation is repeated "
                "--inference-runs times; or, where the randomness is dropout left on at evaluation, switch it "
                f"off: {EVAL_MODE_FIX}"]
    return []


def _feature_split_fixes(method: Method, x: torch.Tensor) -> List[str]:
    overridden = [type(method).features is not Method.features,
                  type(method).predict_from_features is not Method.predict_from_features]
    if overridden == [False, False]:
        return []
    if not all(overridden):
        return ["override both features and predict_from_features, or neither"]
    if not torch.allclose(_predict(method, x, seed=3, features=True), _predict(method, x, seed=3),
                          rtol=1e-4, atol=1e-5, equal_nan=True):
        return ["predict_from_features(features(x)) must equal predict(x) for the same seed: keep every random "
                "draw and every setting-dependent step in predict_from_features"]
    return []
