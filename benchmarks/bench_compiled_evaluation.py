"""Compilation charged to evaluation under ``--compile``: the warm-up that compiles the inference path at two
batch sizes (so the graph is dynamic in the batch and evaluation batches of other sizes reuse it) against
compiling it once at the training batch (the first evaluation batch then recompiles).

Both sides run the same compiled trial (eager fp32 otherwise, CPU) with torch.compile's caches emptied and
inductor's on-disk graph cache off, so each pays its own compilation, and must reach identical accuracies.
The trial's ``eval_seconds`` of each side, and their ratio, are printed and stored in ``extra_info``; at
full size the two-size warm-up must cut evaluation time by ``TARGET_SPEEDUP``. Full size: NoProp-DT on
mnist5k (noprop_cnn, 6,400 training samples so both sides train the same 50 steps, 2 checkpoints); smoke
size: the conformance kit's linear method on its tiny data, 5 steps.

    NOPROP_BENCH_FULL=1 pytest benchmarks/bench_compiled_evaluation.py -s
"""

import pytest
import torch

from noprop_bench.run import runner
from noprop_bench.run.budget import Budget
from noprop_bench.run.runner import RunData, TrialSpec, run_trial
from noprop_bench.testing.tiny import ConformanceDataset, ConformanceMethod
from noprop_bench_plugins.datasets.mnist5k import MNIST5k
from noprop_bench_plugins.methods.noprop_dt import NoPropDT

TARGET_SPEEDUP = 1.5  # a 5 s trial on the 2-core CPU went from 21.1 s to 6.8 s of evaluation (3.1x)


def _at_the_training_batch_only(method, x, compiled=True):
    """The warm-up's inference before: once, at the training batch, on an ordinary tensor."""
    setting = method.checkpoint_setting()
    if method.reuses_features():
        return lambda: method.predict_from_features(method.features(x), **setting)
    return lambda: method.predict(x, **setting)


def _compiled_trial(smoke: bool, two_sizes: bool, monkeypatch) -> dict:
    if smoke:
        method, params, dataset, backbone, budget = ConformanceMethod, {}, ConformanceDataset(), "noprop_cnn", "5steps"
    else:
        method, params, dataset, backbone, budget = NoPropDT, {}, MNIST5k(), "noprop_cnn", "6400samples"
    spec = TrialSpec(method=method, params=method.resolve_params(params), dataset=dataset.name, backbone=backbone,
                     budget=Budget.parse(budget), seed=0, batch_size=16 if smoke else 128, device=torch.device("cpu"),
                     augment="none", checkpoints=2, speed_settings={"compile": "default"})
    torch._dynamo.reset()
    with monkeypatch.context() as patch, torch._inductor.config.patch(fx_graph_cache=False):
        if not two_sizes:
            patch.setattr(runner, "_warm_up_inference", _at_the_training_batch_only)
        record = run_trial(spec, RunData.load(dataset, torch.device("cpu")))
    assert record["status"] == "ok", record.get("error")
    return record


def test_the_warm_up_keeps_compilation_out_of_evaluation(benchmark, smoke, monkeypatch):
    records = {}

    def both():
        for two_sizes in (False, True):
            records[two_sizes] = _compiled_trial(smoke, two_sizes, monkeypatch)

    benchmark.pedantic(both, rounds=1, iterations=1)
    before, after = records[False], records[True]
    assert [point["test_acc"] for point in after["curve"]] == [point["test_acc"] for point in before["curve"]]
    speedup = before["eval_seconds"] / after["eval_seconds"]
    benchmark.extra_info.update({"eval_seconds_training_batch": before["eval_seconds"],
                                 "eval_seconds_two_sizes": after["eval_seconds"], "speedup": speedup,
                                 "warmup_seconds_training_batch": before["warmup_seconds"],
                                 "warmup_seconds_two_sizes": after["warmup_seconds"]})
    print(f"\nevaluation seconds of a compiled {after['method']} trial: warm-up at the training batch "
          f"{before['eval_seconds']:.1f} s, at two sizes {after['eval_seconds']:.1f} s ({speedup:.2f}x); "
          f"warm-up {before['warmup_seconds']:.1f} s -> {after['warmup_seconds']:.1f} s")
    if not smoke:
        assert speedup >= TARGET_SPEEDUP
