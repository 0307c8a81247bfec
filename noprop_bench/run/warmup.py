"""Untimed warm-up before a trial's clock starts, leaving the method exactly as it was.

Warm-up steps pay for what the first steps of a process would otherwise charge to the budget: lazy
CUDA initialisation, cuDNN autotuning, torch.compile's tracing and code generation. They are real
``train_step`` calls, so they change parameters, optimiser moments, counters and random generators;
:class:`MethodState` captures all of that first and puts it back afterwards, so no training happens
off the clock.
"""

import copy
import random
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

WARMUP_STEPS = 3  # CUDA graphs (compile mode reduce-overhead) record on the third call
_MODULE_INTERNALS = frozenset(vars(nn.Module()))
_PLAIN = (int, float, bool, str, type(None))


def _is_plain(value: Any) -> bool:
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(_is_plain(k) and _is_plain(v) for k, v in value.items())
    return False


def _stateful(value: Any) -> bool:
    return isinstance(value, (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, torch.Generator))


def _stateful_objects(module: nn.Module):
    """``(attribute name, objects)`` for each attribute of ``module`` holding an optimiser, an LR scheduler or
    a generator (one object), or a non-empty list or tuple of them."""
    for key, value in vars(module).items():
        if _stateful(value):
            yield key, [value]
        elif isinstance(value, (list, tuple)) and value and all(_stateful(v) for v in value):
            yield key, list(value)


def method_optimizers(method: nn.Module) -> List[torch.optim.Optimizer]:
    """Every optimiser held by ``method`` or its submodules, alone or in a list (one per block), once each."""
    found: Dict[int, torch.optim.Optimizer] = {}
    for module in method.modules():
        for _, objects in _stateful_objects(module):
            found.update((id(v), v) for v in objects if isinstance(v, torch.optim.Optimizer))
    return list(found.values())


def _save_object(value: Any) -> Any:
    if isinstance(value, torch.Generator):
        return value.get_state()
    return copy.deepcopy(value.state_dict())


def _restore_object(value: Any, saved: Any) -> None:
    if isinstance(value, torch.Generator):
        value.set_state(saved)
    elif not (isinstance(value, torch.optim.Optimizer) and _restore_optimizer_in_place(value, saved)):
        value.load_state_dict(copy.deepcopy(saved))


# optimisers whose fresh per-parameter state is these tensors, all zero: zeroing them in place is exact
_ADAM_STATE = frozenset({"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"})
_ZERO_STATE = {torch.optim.Adam: _ADAM_STATE, torch.optim.AdamW: _ADAM_STATE}


def _restore_optimizer_in_place(optimizer: torch.optim.Optimizer, saved: Dict[str, Any]) -> bool:
    """Put the ``state_dict()`` ``saved`` back into the optimiser's own tensors and group dicts.

    ``load_state_dict`` would replace them, and a compiled train step guards on them: its first timed step
    would compile again, on the clock. State the warm-up created is zeroed, which is exact only where a
    fresh state is all zeros (``_ZERO_STATE``); returns False, touching nothing, where it cannot be exact.
    ``capturable``, which torch.compile turns on for CUDA parameters when it traces a step, is left as is.
    The state keeps zeroed entries where ``load_state_dict`` would leave none: the same numbers follow.
    """
    groups = optimizer.param_groups
    if len(groups) != len(saved["param_groups"]):
        return False
    params = [p for group in groups for p in group["params"]]
    plan = []
    for index, param in enumerate(params):
        now, before = optimizer.state.get(param), saved["state"].get(index)
        if not now:
            if before:
                return False
        elif before is None:
            if not set(now) <= _ZERO_STATE.get(type(optimizer), set()) or not all(
                    isinstance(v, torch.Tensor) for v in now.values()):
                return False
            plan.extend((tensor, None) for tensor in now.values())
        elif set(now) == set(before) and all(isinstance(now[k], torch.Tensor) and isinstance(before[k], torch.Tensor)
                                             and now[k].shape == before[k].shape for k in now):
            plan.extend((now[k], before[k]) for k in now)
        else:
            return False
    with torch.no_grad():
        for tensor, value in plan:
            if value is None:
                tensor.zero_()
            else:
                tensor.copy_(value)
    for group, saved_group in zip(groups, saved["param_groups"]):
        for key, value in saved_group.items():
            if key in ("params", "capturable"):
                continue
            if isinstance(group.get(key), torch.Tensor) and isinstance(value, torch.Tensor):
                group[key].copy_(value)
            else:
                group[key] = copy.deepcopy(value)
    return True


def _random_states() -> Tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda, random.getstate(), np.random.get_state()


def _set_random_states(states: Tuple) -> None:
    cpu, cuda, python, numpy = states
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(python)
    np.random.set_state(numpy)


class MethodState:
    """Everything a ``train_step`` may change: parameters, gradients, buffers, optimisers, LR schedulers,
    generators and plain Python attributes (counters, lists of numbers) of every submodule, plus the
    global random generators. Objects held in lists or tuples (one optimiser per block) count too."""

    def __init__(self, method: nn.Module):
        self.method = method
        with torch.no_grad():
            # by owner and name, not by tensor object: Module.to (a block moved between host and device)
            # puts new buffer tensors in place, and it is the tensors there at the end that must be restored
            self.tensors = [(module, table, name, tensor.detach().clone()) for module, table, name, tensor
                            in self._tensors()]
            self.grads = [(p, None if p.grad is None else p.grad.detach().clone()) for p in method.parameters()]
        self.objects: List[Tuple[Any, Any]] = []
        self.plain: List[Tuple[nn.Module, str, Any]] = []
        self.plain_objects: List[Tuple[Any, Dict[str, Any]]] = []
        for module in method.modules():
            stateful = dict(_stateful_objects(module))
            for key, value in vars(module).items():
                if key in _MODULE_INTERNALS and key != "training":
                    continue
                if key in stateful:
                    self.objects.extend((v, _save_object(v)) for v in stateful[key])
                elif _is_plain(value):
                    self.plain.append((module, key, copy.deepcopy(value)))
                elif _is_plain_object(value):  # restored in place: others may hold a reference
                    self.plain_objects.append((value, copy.deepcopy(vars(value))))
        self.random = _random_states()

    def _tensors(self) -> List[Tuple[nn.Module, str, str, torch.Tensor]]:
        """(module, ``_parameters`` or ``_buffers``, name, tensor) for every parameter and buffer, each once."""
        seen, found = set(), []
        for module in self.method.modules():
            for table in ("_parameters", "_buffers"):
                for name, tensor in getattr(module, table).items():
                    if tensor is not None and id(tensor) not in seen:
                        seen.add(id(tensor))
                        found.append((module, table, name, tensor))
        return found

    def restore(self) -> None:
        with torch.no_grad():
            for module, table, name, saved in self.tensors:
                getattr(module, table)[name].copy_(saved)
            for parameter, grad in self.grads:
                parameter.grad = grad
        for value, saved in self.objects:
            _restore_object(value, saved)
        for module, key, saved in self.plain:
            object.__setattr__(module, key, copy.deepcopy(saved))
        for value, saved in self.plain_objects:
            vars(value).clear()
            vars(value).update(copy.deepcopy(saved))
        _set_random_states(self.random)


def _is_plain_object(value: Any) -> bool:
    """A small bookkeeping object (e.g. a counter class) whose attributes are all plain data."""
    if isinstance(value, (nn.Module, torch.Tensor, type)) or callable(value) or not hasattr(value, "__dict__"):
        return False
    return all(_is_plain(v) for v in vars(value).values())


def warm_up(method: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = WARMUP_STEPS,
            inference: Optional[Callable[[], Any]] = None, synchronize: Callable[[], None] = lambda: None,
            method_calls: bool = False) -> Dict[str, float]:
    """Run ``steps`` train steps on ``(x, y)`` (with ``method_calls``, then the method's ``warm_up_calls``;
    and ``inference()`` once, if given), then restore the method.

    Returns ``warmup_seconds`` (all of it) and ``first_step_seconds`` (the first call, where compilation
    happens), both wall time with the device synchronised.
    """
    state = MethodState(method)
    was_training = method.training
    started = time.perf_counter()
    first = 0.0
    try:
        for step in range(steps):
            method.train()
            method.train_step(x, y)
            if step == 0:
                synchronize()
                first = time.perf_counter() - started
        if method_calls and hasattr(method, "warm_up_calls"):
            method.train()
            method.warm_up_calls(x, y)
        if inference is not None:
            method.eval()
            with torch.inference_mode():
                inference()
        synchronize()
    finally:
        state.restore()
        method.train(was_training)
    return {"warmup_seconds": time.perf_counter() - started, "first_step_seconds": first}
