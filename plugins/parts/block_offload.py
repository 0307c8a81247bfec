"""Keeping all but one of a model's blocks, with their optimiser state, in host memory."""

from typing import Optional, Sequence

import torch
from torch import nn


def _device_of(module: nn.Module) -> Optional[torch.device]:
    first = next(module.parameters(), None)
    return None if first is None else first.device


def _with_index(device: torch.device) -> torch.device:
    """``cuda`` as ``cuda:N`` (the current device), as parameters report it; ``cuda`` never equals ``cuda:0``."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def move_block(block: nn.Module, optimizer: Optional[torch.optim.Optimizer], device: torch.device) -> None:
    """Move ``block``'s parameters and buffers and ``optimizer``'s per-parameter state to ``device``.

    The parameters stay the same objects (``Module.to`` moves their data), so the optimiser still holds
    them. Adam's ``step`` counters stay where the optimiser keeps them (on the host, unless capturable).
    """
    block.to(device)
    if optimizer is None:
        return
    for state in optimizer.state.values():
        for key, value in state.items():
            if key != "step" and torch.is_tensor(value) and value.device != device:
                state[key] = value.to(device, non_blocking=True)


class MoveCount:
    """The block transfers an offload has made: a plain object, so a method holding it as an attribute has
    it put back by the harness's warm-up like its other counters."""

    def __init__(self):
        self.moves = 0


class BlockOffload:
    """One block on the training device at a time; the others and their optimiser state on the host.

    :meth:`activate` is called before a block is used: every other block goes to the host and block
    ``index`` comes in (moves happen only when a block is not already where it belongs, so a model moved
    as a whole afterwards, e.g. by ``Module.to``, is put right on the next call). ``moves`` counts the
    block transfers (kept in ``count``, a :class:`MoveCount`). On a CPU device the host is the device and
    nothing moves.
    """

    def __init__(self, blocks: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer],
                 device: torch.device, host: torch.device = torch.device("cpu")):
        self.blocks, self.optimizers = list(blocks), list(optimizers)
        self.device, self.host = _with_index(torch.device(device)), _with_index(torch.device(host))
        self.count = MoveCount()

    @property
    def moves(self) -> int:
        return self.count.moves

    def activate(self, index: int) -> None:
        for i, (block, optimizer) in enumerate(zip(self.blocks, self.optimizers)):
            target = self.device if i == index else self.host
            current = _device_of(block)
            if current is not None and current != target:
                move_block(block, optimizer, target)
                self.count.moves += 1
