"""The speed probe's estimate of a trial's wall time, set against the trial it estimates."""

import torch

import fake_plugins
from noprop_bench.run.budget import Budget
from noprop_bench.run.probe import probe_trial
from noprop_bench.run.runner import RunData, TrialSpec, run_trial


def test_the_probe_counts_every_evaluation_a_trial_makes(one_thread):
    """A method whose every inference call takes 0.1 s: the trial evaluates at each checkpoint, at the end,
    and while warming up. Before, the probe counted only the final evaluation (a fifth of it here)."""
    method = fake_plugins.Sleepy
    data = RunData.load(fake_plugins.Tiny(), torch.device("cpu"))
    spec = TrialSpec(method=method, params=method.resolve_params({"predict_sleep": "0.1", "step_sleep": "0.005"}),
                     dataset="tiny", backbone="noprop_cnn", budget=Budget.parse("40steps"), seed=0, batch_size=32,
                     device=torch.device("cpu"), augment="none", inference_runs=1, checkpoints=4, checkpoint_size=0)
    training, evaluation = probe_trial(spec, data)
    record = run_trial(spec, data)
    assert record["status"] == "ok" and len(record["curve"]) == 5  # 4 checkpoints and the end
    measured = record["eval_seconds"] + record["warmup_seconds"]
    assert 0.7 * measured < evaluation < 1.5 * measured, (evaluation, measured)
    assert 0.5 * record["train_seconds"] < training < 2 * record["train_seconds"], (training, record["train_seconds"])
