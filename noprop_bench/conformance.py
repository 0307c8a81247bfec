"""The cheap contract checks the host runs on every method it builds, each violation worded as its fix.

``noprop_bench.testing`` runs these and the thorough ones from a plugin author's tests; the runner runs
these at the start of every trial, so a broken plugin fails with one line naming the plugin, the class
and the fix instead of an error from deep inside torch.
"""

import inspect
from typing import Any, Dict, List, Mapping, Optional, Tuple, Type

import torch

from .method import Method
from .provenance import plugin_of

SUPER_INIT_FIX = "call super().__init__(task, **params) first in __init__, before creating any module or tensor"


class ContractViolation(RuntimeError):
    """A plugin broke the contract; the message names the plugin, the class and the fix."""


def describe_class(cls: type) -> str:
    return f"plugin {plugin_of(cls)!r}, class {cls.__module__}.{cls.__qualname__}"


def violation(cls: type, fixes: List[str]) -> ContractViolation:
    return ContractViolation(f"{describe_class(cls)}: " + "; ".join(fixes))


def build_method(cls: Type[Method], task, params: Mapping[str, Any]) -> Method:
    """``cls(task, **params)``, turning a skipped ``super().__init__`` into a :class:`ContractViolation`.

    Other errors (a :class:`~noprop_bench.errors.UsageError` included) propagate unchanged.
    """
    instance = cls.__new__(cls)
    try:
        instance.__init__(task, **params)
    except AttributeError as error:
        if "_modules" not in vars(instance):  # torch's own message would say only that '_modules' is missing
            raise violation(cls, [SUPER_INIT_FIX]) from error
        raise
    fixes = built_method_fixes(instance)
    if fixes:
        raise violation(cls, fixes)
    return instance


def built_method_fixes(method: Method) -> List[str]:
    """What is wrong with a freshly built method, as fixes (empty when nothing is)."""
    initialised = "_modules" in vars(method) and hasattr(method, "task")
    if not initialised or not isinstance(getattr(method, "params", None), dict):
        return [SUPER_INIT_FIX]
    return signature_fixes(method) + target_fixes(method)


# what the harness passes each contract method it calls (by position); the optional pair only where overridden
CALLS = (("train_step", ("x", "y")), ("predict", ("x",)), ("features", ("x",)),
         ("predict_from_features", ("features",)))


def signature_fixes(method: Method) -> List[str]:
    """Contract methods whose signature cannot take the arguments the harness passes (the inference path,
    ``predict`` or ``predict_from_features``, also the keywords of ``checkpoint_setting()``): found when the
    method is built, not as a TypeError from inside the harness at its first call."""
    setting = method.checkpoint_setting()
    setting = setting if isinstance(setting, dict) and all(isinstance(key, str) for key in setting) else {}
    inference = "predict_from_features" if method.reuses_features() else "predict"
    fixes = []
    for name, arguments in CALLS:
        own = getattr(type(method), name, None)
        if own is getattr(Method, name) or not callable(own):
            continue
        keywords = setting if name == inference else {}
        try:  # the signature callers see: a decorator that fills in an argument takes fewer than it wraps
            signature = inspect.signature(getattr(method, name), follow_wrapped=False)
        except (TypeError, ValueError):  # no signature to read (a C function, a wrapper): nothing to judge
            continue
        try:
            signature.bind(*arguments, **keywords)
        except TypeError:
            given = ", ".join([*arguments, *(f"{key}=..." for key in keywords)])
            needs = (f"def {name}(self, {', '.join(arguments)}, **setting)" if keywords else
                     f"def {name}(self, {', '.join(arguments)})")
            fixes.append(f"{name} must take ({given}) ({needs}), not {signature}")
    return fixes


TARGET_HOOKS = ("compile_targets", "capture_targets", "capture_step_targets")


def resolve_target(method: Method, path: str) -> Optional[Tuple[Any, str]]:
    """The object owning the dotted attribute ``path`` (e.g. ``model.logits``) of ``method`` and the attribute's
    name, or None when the path does not lead to something to call."""
    owner_path, _, name = path.rpartition(".")
    owner: Any = method
    for part in filter(None, owner_path.split(".")):
        owner = getattr(owner, part, None)
    return (owner, name) if callable(getattr(owner, name, None)) else None


def target_fixes(method: Method) -> List[str]:
    """Paths named by the speed-setting hooks (``compile_targets()`` and the capture hooks) that are not
    callable attributes of the method: found when it is built, in every mode, not first under ``--compile``."""
    fixes = []
    for hook in TARGET_HOOKS:
        paths = getattr(method, hook)()
        if not isinstance(paths, (list, tuple)) or not all(isinstance(path, str) for path in paths):
            fixes.append(f"{hook}() must return a list of attribute names such as ['train_step'], not {paths!r}")
            continue
        missing = [path for path in paths if resolve_target(method, path) is None]
        if missing:
            fixes.append(f"{hook}() names {', '.join(map(repr, missing))}, which the method has no callable "
                         f"attribute of; name its methods (e.g. 'train_step', or 'model.forward' for a submodule's)")
    return fixes


def step_metrics_fixes(metrics: Any) -> List[str]:
    """What is wrong with what ``train_step`` returned."""
    if not isinstance(metrics, dict):
        return [f"train_step must return a dict of tensors such as {{'loss': loss.detach()}}, "
                f"not {type(metrics).__name__}"]
    not_tensors = sorted(str(key) for key, value in metrics.items() if not isinstance(value, torch.Tensor))
    if not_tensors:
        verb = "is not a tensor" if len(not_tensors) == 1 else "are not tensors"
        return [f"train_step must return tensors (e.g. loss.detach(), not loss.item()) in its dict; "
                f"{', '.join(repr(key) for key in not_tensors)} {verb}"]
    return []


def loss_fixes(metrics: Dict[str, Any]) -> List[str]:
    """What is wrong with the ``"loss"`` a method returned (missing: see ``MISSING_LOSS_WARNING``)."""
    loss = metrics.get("loss")
    if isinstance(loss, torch.Tensor) and loss.numel() != 1:
        return [f"train_step's 'loss' must be a scalar tensor, not one of shape {list(loss.shape)}"]
    return []


MISSING_LOSS_WARNING = ("train_step returns no 'loss': the harness cannot see a diverging loss, only non-finite "
                        "predictions at evaluations; return {'loss': loss.detach(), ...}")


def logits_fixes(logits: Any, batch: int, num_classes: int, device: Optional[torch.device] = None) -> List[str]:
    """What is wrong with the output of ``predict`` on a batch of ``batch`` images."""
    expected = f"floating logits of shape [B, num_classes] = [{batch}, {num_classes}]"
    if not isinstance(logits, torch.Tensor):
        return [f"predict must return a tensor of {expected}, not {type(logits).__name__}"]
    fixes = []
    if tuple(logits.shape) == (batch,) and not logits.is_floating_point():
        fixes.append(f"predict must return {expected}, not class indices (shape {list(logits.shape)}, dtype "
                     f"{logits.dtype}): return the scores before argmax; the harness takes the argmax")
    else:
        if tuple(logits.shape) != (batch, num_classes):
            fixes.append(f"predict must return {expected}, not shape {list(logits.shape)}")
        if not logits.is_floating_point():
            fixes.append(f"predict must return {expected}, not dtype {logits.dtype}")
    if device is not None and logits.device.type != torch.device(device).type:
        fixes.append(f"predict must return its logits on task.device ({device}), not on {logits.device}")
    return fixes
