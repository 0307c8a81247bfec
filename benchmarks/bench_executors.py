"""Executors: wall time of one small grid (2 methods x 2 seeds on mnist5k, a sample budget, one thread per
trial) under each executor, against the default in-process executor.

Every round runs the grid once per executor, in turn, each as a fresh ``noprop-bench`` process, so each
pays the same start-up (imports, data loading) and drifting machine load hits all alike. The ratio of
medians ``executor wall / local wall`` is stored in ``extra_info`` and printed; the test accuracies
must be identical under every executor.

    NOPROP_BENCH_FULL=1 pytest benchmarks/bench_executors.py -s
"""

import importlib.util
import json
import statistics
import subprocess
import sys
import time


EXECUTORS = ["local", "local[workers=2]"]
if importlib.util.find_spec("submitit"):
    EXECUTORS.append("submitit[cluster=local]")
if importlib.util.find_spec("ray"):
    EXECUTORS.append("ray")


def _grid(executor: str, samples: int, out, methods: str) -> float:
    command = [sys.executable, "-m", "noprop_bench", "--methods", methods, "--dataset", "mnist5k",
               "--budget", f"{samples}samples", "--seeds", "2", "--checkpoints", "0", "--inference-runs", "2",
               "--threads", "1", "--device", "cpu", "--executor", executor, "--out", str(out)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-2000:]
    return seconds


def _accuracies(out):
    with open(out / "trials.jsonl") as handle:
        return {r["trial_id"]: r["test_acc_runs"] for r in map(json.loads, handle)}


def test_executor_wall_time(benchmark, smoke, tmp_path):
    # the smoke pass runs the in-process executor alone: tests/test_executors.py proves the others equal
    executors = EXECUTORS[:1] if smoke else EXECUTORS
    samples, rounds = (256, 1) if smoke else (8192, 3)
    # the smoke pass only keeps the benchmark running: NoProp-FM's 1000-step inference would take most of it
    methods = "backprop,noprop_fm[steps=10]" if smoke else "backprop,noprop_fm"
    walls = {executor: [] for executor in executors}
    accuracies = {}

    def one_round():
        for executor in executors:
            out = tmp_path / f"{len(walls[executor])}-{executor}"
            walls[executor].append(_grid(executor, samples, out, methods))
            accuracies.setdefault(executor, _accuracies(out))

    benchmark.pedantic(one_round, rounds=rounds, iterations=1)
    if len(executors) > 1:  # (the smoke pass has the in-process executor alone: nothing to compare it with)
        assert all(found == accuracies["local"] for found in accuracies.values())
    local = statistics.median(walls["local"])
    lines = []
    for executor, seconds in walls.items():
        median = statistics.median(seconds)
        benchmark.extra_info[f"{executor} wall s"] = median
        benchmark.extra_info[f"{executor} / local"] = median / local
        lines.append(f"  {executor:<24} {median:6.1f} s  {median / local:5.2f}x")
    print(f"\ngrid of 4 trials x {samples} samples, median wall of {rounds} round(s):\n" + "\n".join(lines))
