"""Local workers: seconds from a pool's start until two CPU workers have loaded the plugins and answered a job,
forked from the fork server (already running) against spawned, side by side in alternating rounds; the ratio
of medians is stored in ``extra_info`` and printed. At full size a forked start must take at most half a
spawned one (measured on a 2-core CPU: 0.16 s against 2.3 s).

    NOPROP_BENCH_FULL=1 pytest benchmarks/bench_worker_start.py -s
"""

import statistics
import sys
import time

import pytest

from noprop_bench.executor import TrialJob
from noprop_bench_plugins.executors import local as local_executor
from noprop_bench_plugins.executors.local import LocalExecutor

TARGET_RATIO = 0.5


def _two_workers_answer(method: str, monkeypatch) -> float:
    monkeypatch.setattr(local_executor, "_start_method", lambda device: method)
    executor = LocalExecutor("local[workers=2]", workers=2)
    executor.device_type("cpu")
    pool = local_executor._Pool(executor, 1, lambda message: None)
    # a job naming no real method: its failed record comes back once the worker has loaded the plugins
    job = TrialJob(spec={"method": "nope", "dataset": "nope"}, header={"trial_id": "x", "row_label": "r", "seed": 0},
                   data_root=None, download=False, threads=1, executor="local[workers=2]")
    started = time.perf_counter()
    workers = [pool._start(number) for number in range(2)]
    for worker in workers:
        worker.connection.send(job)
    for worker in workers:
        while worker.connection.recv()[0] != "record":
            pass
    seconds = time.perf_counter() - started
    for worker in workers:
        worker.connection.send(None)
        worker.process.join(timeout=10)
    return seconds


@pytest.mark.skipif(local_executor._start_method("cpu") != "forkserver", reason="no fork server on this platform")
def test_worker_start(benchmark, smoke, monkeypatch):
    _two_workers_answer("forkserver", monkeypatch)  # starts the fork server: not what is compared
    rounds = 1 if smoke else 5
    times = {"forkserver": [], "spawn": []}

    def measure():
        for _ in range(rounds):
            for method in times:
                times[method].append(_two_workers_answer(method, monkeypatch))

    benchmark.pedantic(measure, rounds=1, iterations=1)
    forked, spawned = (statistics.median(times[m]) for m in ("forkserver", "spawn"))
    benchmark.extra_info.update(forked_seconds=forked, spawned_seconds=spawned, ratio=forked / spawned)
    print(f"\ntwo workers ready: forked {forked:.2f} s, spawned {spawned:.2f} s (ratio {forked / spawned:.2f}, "
          f"medians of {rounds}, {sys.platform})")
    if not smoke:
        assert forked / spawned <= TARGET_RATIO
