"""Run T modules of one architecture as one vectorised call (``torch.func.stack_module_state`` + ``vmap``).

The modules stay the source of truth: each call stacks their current parameters and buffers, evaluates
every module on its own slice of the per-module inputs at once, and :meth:`ParallelModules.write_back`
hands each module its gradient slice and its updated buffers (e.g. batch-norm running statistics), so
each module's own optimiser then steps exactly as if the module had been trained alone.
"""

import copy
from typing import Callable, Dict, Sequence

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap


class _Call(nn.Module):
    """Makes ``call(module, *args)`` the ``forward`` of a module, so ``functional_call`` can run it."""

    def __init__(self, inner: nn.Module, call: Callable[..., torch.Tensor]):
        super().__init__()
        self.inner = inner
        self.call = call

    def forward(self, *args):
        return self.call(self.inner, *args)


class ParallelModules:
    """``call(module_t, *per_module[t], *shared)`` for every t at once; the modules must share their
    architecture (any ``nn.Module``)."""

    def __init__(self, modules: Sequence[nn.Module], call: Callable[..., torch.Tensor]):
        self.modules = list(modules)
        self.template = _Call(copy.deepcopy(self.modules[0]).to("meta"), call)
        self.params: Dict[str, torch.Tensor] = {}
        self.buffers: Dict[str, torch.Tensor] = {}

    def __call__(self, per_module: Sequence[torch.Tensor], shared: Sequence[torch.Tensor]) -> torch.Tensor:
        """Stacked outputs ``[T, ...]``; gradients reach the stacked parameters (see :meth:`write_back`)."""
        params, buffers = stack_module_state(self.modules)
        self.params, self.buffers = params, buffers
        prefixed_params = {f"inner.{k}": v for k, v in params.items()}
        prefixed_buffers = {f"inner.{k}": v for k, v in buffers.items()}
        per_count = len(per_module)

        def one(p, b, *args):
            return functional_call(self.template, (p, b), tuple(args))

        dims = (0, 0) + (0,) * per_count + (None,) * len(shared)
        # "different": each module draws its own dropout masks, as it would alone (from another RNG stream)
        return vmap(one, in_dims=dims, randomness="different")(prefixed_params, prefixed_buffers, *per_module, *shared)

    def write_back(self) -> None:
        """Each module gets its slice of the stacked gradients (as ``.grad``) and of the updated buffers."""
        with torch.no_grad():
            for index, module in enumerate(self.modules):
                for name, parameter in module.named_parameters():
                    stacked = self.params[name]
                    parameter.grad = None if stacked.grad is None else stacked.grad[index].clone()
                for name, buffer in module.named_buffers():
                    buffer.copy_(self.buffers[name][index])
        self.params, self.buffers = {}, {}
