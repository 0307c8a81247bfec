"""A trial's final evaluation with ``--inference-sweep``: one backbone pass over the test split shared by
every inference run, sweep point and diagnostic, against recomputing it for each of them.

Both sides evaluate the same NoProp-CT (or NoProp-DT: its T blocks' image paths) model (trained for a
few steps: the cost of evaluation does not depend on training) on mnist5k's 1,000 test images with the
method's own sweep and 5 inference runs, and must give identical accuracies. Rounds alternate between
the two; the ratio of the medians of the evaluation seconds is printed and stored in ``extra_info``.
Backbone noprop_cnn (mnist5k's default; the gain grows with the backbone's share of the cost, e.g.
resnet18 or a GPU); full size: the method's defaults (CT: 1000-step inference, sweep of 2..1000 steps;
DT: 10 blocks); smoke size: CT at 10 inference steps and two sweep points, DT with 3 blocks, 2 runs.

    NOPROP_BENCH_FULL=1 pytest benchmarks/bench_final_evaluation.py -s
"""

import statistics

import pytest
import torch

from noprop_bench.run.budget import Budget
from noprop_bench.method import Method
from noprop_bench.plugins import load_plugins
from noprop_bench.run.runner import RunData, TrialSpec, run_trial
from noprop_bench_plugins.datasets.mnist5k import MNIST5k


@pytest.fixture(scope="module")
def data():
    return RunData.load(MNIST5k(), torch.device("cpu"))


def _evaluation(data, method: str, backbone: str, params: dict, runs: int, share: bool, monkeypatch):
    cls = load_plugins().method(method)
    spec = TrialSpec(method=cls, params=cls.resolve_params(params), dataset="mnist5k",
                     backbone=backbone, budget=Budget.parse("2steps"), seed=0, batch_size=32,
                     device=torch.device("cpu"), augment="none", checkpoints=0, inference_sweep=True,
                     inference_runs=runs)
    with monkeypatch.context() as patch:
        if not share:
            patch.setattr(Method, "reuses_features", lambda self: False)
        record = run_trial(spec, data)
    assert record["status"] == "ok", record["error"]
    accuracies = [record["test_acc_runs"], record["diagnostics"]] + [p["test_acc_runs"] for p in record["inference_sweep"]]
    return record["eval_seconds"], accuracies


@pytest.mark.parametrize("method", ["noprop_ct", "noprop_dt"])
def test_final_evaluation_shares_the_backbone(benchmark, data, smoke, monkeypatch, method):
    backbone, params, runs, rounds = "noprop_cnn", {}, 5, 3  # the defaults (CT: 1000 steps, sweep of 2..1000)
    if smoke:
        params = {"sweep_steps": "2,5", "steps": 10} if method == "noprop_ct" else {"blocks": 3}
        runs, rounds = 2, 1
    seconds = {True: [], False: []}
    results = {}

    def one_round():
        for share in (False, True):
            elapsed, accuracies = _evaluation(data, method, backbone, params, runs, share, monkeypatch)
            seconds[share].append(elapsed)
            results.setdefault(share, accuracies)

    benchmark.pedantic(one_round, rounds=rounds, iterations=1)
    assert results[True] == results[False]
    shared, whole = statistics.median(seconds[True]), statistics.median(seconds[False])
    benchmark.extra_info.update({"shared_s": shared, "recomputed_s": whole, "speedup": whole / shared,
                                 "method": method, "backbone": backbone, "params": params, "rounds": rounds})
    print(f"\nfinal evaluation of {method} ({backbone}, {params or 'default parameters'}, {runs} runs): "
          f"recomputed {whole:.1f} s, shared {shared:.1f} s: {whole / shared:.2f}x "
          f"(medians of {rounds} alternating rounds)")
