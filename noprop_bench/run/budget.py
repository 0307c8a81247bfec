"""Training budgets and the clock that spends them."""

import math
import re
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..errors import UsageError

_BUDGET = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|seconds|samples|steps|epochs)?\s*(?:\((\w+)\))?\s*$")


@dataclass(frozen=True)
class Budget:
    """How much training each trial gets: ``amount`` of ``unit`` (seconds, samples, steps or epochs).

    One epoch is one pass over the training split, for every method: ``len(train)`` training samples.
    For NoProp-DT, which trains one block per batch under its sequential and random schedules, the passes
    are summed over its blocks (under ``schedule=sequential`` each of T blocks sees ``epochs / T`` passes of
    its own); under ``schedule=parallel`` every block trains on every batch and sees all ``epochs``.
    ``name`` is set when the amount came from a named budget such as ``paper`` (the paper's epochs per
    method and dataset).
    """

    amount: float
    unit: str
    name: Optional[str] = None

    @classmethod
    def parse(cls, text: str) -> "Budget":
        """``"120"``/``"120s"`` (seconds of training work), ``"20000samples"``, ``"500steps"``, ``"20epochs"``."""
        match = _BUDGET.match(str(text))
        if not match or float(match.group(1)) <= 0:
            raise UsageError(
                f"budget {text!r} not understood; accepted: SECONDS (e.g. 120 or 120s), "
                f"Nsamples (e.g. 20000samples), Nsteps (e.g. 500steps), Nepochs (e.g. 20epochs) or paper, "
                f"greater than zero"
            )
        unit = match.group(2) or "s"
        unit = "seconds" if unit in ("s", "sec", "seconds") else unit
        amount = float(match.group(1))
        if unit != "seconds":
            whole, _, fraction = match.group(1).partition(".")
            if fraction.strip("0"):
                raise UsageError(f"budget {text!r}: a count of {unit} must be a whole number")
            amount = int(whole)  # exactly as written: a float would round a long count
        if amount >= 2 ** 63 or not math.isfinite(amount):
            raise UsageError(f"budget {text!r}: too large a number")
        return cls(amount, unit, match.group(3))

    def __str__(self) -> str:
        """``120s``, ``500steps``, ``20epochs``; a named budget adds its name: ``100epochs (paper)``."""
        # seconds as the shortest exact decimal, never an exponent: the text goes to workers and is parsed again
        text = (f"{np.format_float_positional(self.amount, trim='-')}s" if self.unit == "seconds"
                else f"{self.amount}{self.unit}")
        return f"{text} ({self.name})" if self.name else text

    @property
    def deterministic(self) -> bool:
        return self.unit != "seconds"

    def progress(self, seconds: float, samples: int, steps: int, train_size: int = 0) -> float:
        """The fraction of the budget spent, from 0 to 1 and beyond (epochs need ``train_size``)."""
        if self.unit == "epochs":
            if train_size <= 0:
                raise ValueError("an epoch budget needs the size of the training split")
            return samples / (self.amount * train_size)
        spent = {"seconds": seconds, "samples": samples, "steps": steps}[self.unit]
        return spent / self.amount


class TrainingClock:
    """Accumulates the wall time of training work only.

    ``start()``/``stop()`` bracket training work; evaluation happens between a ``stop`` and the next
    ``start`` and is not counted. On CUDA the device is synchronised before every reading, so queued
    kernels are charged to the training that launched them.
    """

    def __init__(self, device: torch.device):
        self._cuda = torch.device(device).type == "cuda"
        self._device = device
        self._elapsed = 0.0
        self._started_at = None

    def synchronize(self) -> None:
        """Wait for the device's queued work (a no-op on the CPU)."""
        if self._cuda:
            torch.cuda.synchronize(self._device)

    def _now(self) -> float:
        self.synchronize()
        return time.perf_counter()

    def start(self):
        if self._started_at is None:
            self._started_at = self._now()

    def stop(self):
        if self._started_at is not None:
            self._elapsed += self._now() - self._started_at
            self._started_at = None

    @property
    def running(self) -> bool:
        return self._started_at is not None

    def elapsed(self) -> float:
        """Training seconds so far (synchronises the device while running on CUDA)."""
        if self._started_at is None:
            return self._elapsed
        return self._elapsed + self._now() - self._started_at


class ClockReads:
    """Which steps read the clock when each read costs a device synchronisation (CUDA).

    Far from the end of the budget the clock is read every ``every`` steps; from the average cost of a
    step so far, the next read is brought forward so that it falls before the budget runs out, and near
    the end the clock is read after every step: a trial overshoots its budget by at most one step (as long
    as steps take about the same time). With ``every`` 1 (the CPU, where a read is free) every step reads.
    """

    def __init__(self, every: int):
        self.every = every
        self.next = 1

    def due(self, steps: int) -> bool:
        return steps >= self.next

    def read(self, steps: int, spent: float) -> None:
        """Record a read after ``steps`` steps with ``spent`` of the budget used; plans the next one."""
        per_step = spent / max(steps, 1)
        left = int((1.0 - spent) / per_step) if per_step > 0 else self.every
        self.next = steps + max(1, min(self.every, left))
