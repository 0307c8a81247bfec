"""Where a train step's time goes: ``torch.profiler`` over a few steps, operators ranked by their own time.

On CUDA the ranking is by device time (kernels and copies), and the device's busy time per step set against
the step's wall time tells a step bound by arithmetic from one bound by launches and the host. On the CPU
it is by the operators' own CPU time.
"""

from dataclasses import dataclass
from typing import Any, Callable, Dict, List

import pandas as pd
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity


@dataclass
class StepProfile:
    """The operators of ``steps`` profiled steps: ``top`` (name, calls and own milliseconds per step, share
    of the busy time), and ``busy_ms_per_step`` (the device's on CUDA, the operators' on the CPU)."""

    device_type: str
    steps: int
    busy_ms_per_step: float
    top: List[Dict[str, Any]]

    def as_dict(self) -> Dict[str, Any]:
        return {"device_type": self.device_type, "steps": self.steps, "busy_ms_per_step": self.busy_ms_per_step,
                "top": self.top}

    def markdown(self) -> str:
        """The ranking as a markdown table."""
        frame = pd.DataFrame(self.top, columns=["operator", "calls_per_step", "ms_per_step", "share"])
        frame["share"] = 100 * frame["share"]
        return frame.rename(columns={"calls_per_step": "calls/step", "ms_per_step": "own ms/step",
                                     "share": "% of busy"}).to_markdown(index=False, floatfmt=("", "g", ".3f", ".1f"))


def own_microseconds(event, device_type: str) -> float:
    """An event's own time, counted once: on CUDA only kernels and copies count (CPU operators also carry
    the device time of the kernels they launched, and ``record_function`` regions such as
    ``Optimizer.step`` show up on the device spanning their kernels); on the CPU, the time an operator or
    region spent outside its children."""
    if getattr(event, "is_async", False):
        return 0.0
    if device_type == "cuda":
        on_device = event.device_type != DeviceType.CPU and not getattr(event, "is_user_annotation", False)
        return event.self_device_time_total if on_device else 0.0
    return event.self_cpu_time_total


def profile_steps(step: Callable[[], Any], steps: int, device: torch.device, top: int) -> StepProfile:
    """Profile ``steps`` calls of ``step`` on ``device`` and keep the ``top`` operators by own time."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(device)
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    own = [(event.key, event.count, own_microseconds(event, device.type)) for event in profiler.key_averages()]
    own = [entry for entry in own if entry[2] > 0]
    busy = sum(microseconds for _, _, microseconds in own)
    ranked = sorted(own, key=lambda entry: entry[2], reverse=True)[:top]
    return StepProfile(device_type=device.type, steps=steps, busy_ms_per_step=busy / 1000 / steps,
                       top=[{"operator": name, "calls_per_step": count / steps,
                             "ms_per_step": microseconds / 1000 / steps, "share": microseconds / busy if busy else 0.0}
                            for name, count, microseconds in ranked])
