"""How much of the machine other processes took while a speed row timed its steps.

The 1-minute load average lags: load that starts just before a run, or lasts less than a minute, barely
moves it. The kernel's CPU counters (Linux ``/proc/stat``) less this process's own CPU time give the CPU
seconds every other process used over exactly the timed steps.
"""

import os
import time
from typing import NamedTuple, Optional

BUSY_SHARE = 0.25  # other processes using more than this share of the machine's cores: they competed
SHORTEST_SECONDS = 0.2  # the counters tick every 10 ms or so per core: a shorter span is not measured


class CpuCounters(NamedTuple):
    wall: float  # seconds, monotonic
    machine: float  # CPU seconds the whole machine spent busy
    own: float  # CPU seconds of this process (its threads included)


def cpu_counters() -> Optional[CpuCounters]:
    """Now's counters, or None where the kernel does not give them (no ``/proc/stat``)."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
        ticks = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal (guest time is counted in user already)
    busy = sum(fields[:8]) - fields[3] - (fields[4] if len(fields) > 4 else 0)
    own = os.times()
    return CpuCounters(time.monotonic(), busy / ticks, own.user + own.system)


def others_cpu_share(before: Optional[CpuCounters], after: Optional[CpuCounters],
                     cores: Optional[int] = None) -> Optional[float]:
    """The share (0 to 1) of the machine's ``cores`` that other processes kept busy between two readings;
    None when unknown, or when the readings are too close together for the counters to tell."""
    cores = cores or os.cpu_count()
    if before is None or after is None or not cores or after.wall - before.wall < SHORTEST_SECONDS:
        return None
    others = (after.machine - before.machine) - (after.own - before.own)
    return min(1.0, max(0.0, others / ((after.wall - before.wall) * cores)))
