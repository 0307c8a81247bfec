"""Peak memory of a trial: CUDA max allocated on a GPU, sampled process RSS on a CPU."""

import os
import resource
import threading

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux ``/proc``; elsewhere the lifetime peak)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * _PAGE
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Context manager measuring the peak memory of the work inside it.

    ``kind`` says what was measured: ``cuda_max_allocated`` (bytes the caching allocator handed
    out, as the paper's "process GPU memory allocated") or ``cpu_peak_rss`` (the process's resident
    set, sampled every ``interval`` seconds; it includes the interpreter and the data in memory).
    """

    def __init__(self, device, interval: float = 0.02):
        self.device = torch.device(device)
        self.interval = interval
        self.kind = "cuda_max_allocated" if self.device.type == "cuda" else "cpu_peak_rss"
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._paused = False
        self._lock = threading.Lock()  # a sample is taken whole before or after a pause, never across it
        self._thread = None

    def _sample(self):
        while not self._stop.wait(self.interval):
            with self._lock:
                if not self._paused:
                    self.peak_bytes = max(self.peak_bytes, current_rss_bytes())

    def __enter__(self):
        if self.kind == "cuda_max_allocated":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak_bytes = current_rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def pause(self):
        """Stop counting, keeping the peak so far, e.g. while evaluation runs inside the context. On the CPU
        memory that the work while paused leaves resident (the allocator may keep what it freed) still counts
        after :meth:`resume`."""
        if self.kind == "cuda_max_allocated":
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(self.device))
        else:
            with self._lock:
                self.peak_bytes = max(self.peak_bytes, current_rss_bytes())
                self._paused = True

    def resume(self):
        if self.kind == "cuda_max_allocated":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with self._lock:
                self._paused = False

    def __exit__(self, *exc):
        if self.kind == "cuda_max_allocated":
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(self.device))
        else:
            self._stop.set()
            self._thread.join()
            if not self._paused:
                self.peak_bytes = max(self.peak_bytes, current_rss_bytes())
        return False


WITH_GRAPH_POOLS = "cuda_max_allocated_and_graph_pools"


def with_graph_pools(kind: str, peak_bytes: int, pool_bytes: int):
    """``(peak bytes, kind)`` of a trial whose training updates replayed CUDA graphs holding ``pool_bytes``
    in their private pools: their activations and gradients live there between replays, where max
    allocated does not see them, so the pools are added (kind ``cuda_max_allocated_and_graph_pools``).
    Unchanged for other kinds or without pools."""
    if kind != "cuda_max_allocated" or pool_bytes <= 0:
        return peak_bytes, kind
    return peak_bytes + pool_bytes, WITH_GRAPH_POOLS
