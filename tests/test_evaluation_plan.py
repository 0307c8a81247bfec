"""Evaluation at device speed: checkpoint subsets, train-accuracy subsets and batch sizes leave the final
accuracy as it was."""

import json

import torch

from noprop_bench.datasets import Split
from noprop_bench.report.frames import load_curves
from noprop_bench.report.records import checkpoint_text
from noprop_bench.run import evaluation_plan
from noprop_bench.method import Method
from noprop_bench.run.evaluation_plan import (CPU_EVAL_BATCH, evaluation_batch_size, evaluation_batches,
                                              stratified_subset, train_accuracy_split)
from noprop_bench.run.evaluation import predictions
from noprop_bench.run.runner import evaluate
from noprop_bench_plugins.methods.backprop import Backprop
from noprop_helpers import mnist_shaped_task


def _records(out):
    return [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]


def _split(n=100, classes=4):
    labels = torch.arange(n) % classes
    return Split(torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)),
                 labels)


def test_stratified_subset_is_fixed_and_keeps_class_proportions():
    split = _split(100)
    subset = stratified_subset(split, 40)
    assert len(subset) == 40
    assert torch.bincount(subset.labels).tolist() == [10, 10, 10, 10]
    assert torch.equal(stratified_subset(split, 40).images, subset.images)  # the same images every time
    assert stratified_subset(split, 0) is split and stratified_subset(split, 500) is split
    assert len(train_accuracy_split(split, test_size=20)) == 40


def test_cpu_evaluation_batch_is_the_fixed_size():
    assert evaluation_batch_size(torch.device("cpu"), (3, 32, 32)) == CPU_EVAL_BATCH


def test_cuda_evaluation_batch_counts_the_allocators_cached_memory_as_free(monkeypatch):
    """Memory held cached from earlier trials must not shrink a later trial's batches."""
    cuda = evaluation_plan.torch.cuda
    image = evaluation_plan.image_bytes_estimate((3, 32, 32))
    share = evaluation_plan.CUDA_FREE_MEMORY_SHARE
    monkeypatch.setattr(cuda, "memory_allocated", lambda device=None: 0)
    sizes = []
    for driver_free, cached in ((8000 * image / share, 0), (5000 * image / share, 3000 * image / share)):
        monkeypatch.setattr(cuda, "mem_get_info", lambda device=None, free=driver_free: (int(free), 2 * int(free)))
        monkeypatch.setattr(cuda, "memory_reserved", lambda device=None, held=cached: int(held))
        sizes.append(evaluation_batch_size(torch.device("cuda"), (3, 32, 32)))
    assert sizes == [8000, 8000]


def test_evaluation_batch_size_does_not_change_a_deterministic_prediction(one_thread):
    task = mnist_shaped_task(make_backbone=lambda: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 8)),
                             features=8)
    method = Backprop(task)
    split = Split(task.train_images, task.train_labels)
    logits = [predictions(method, split, task.normalize, batch, seed=0) for batch in (1, 7, 40, 1000)]
    for other in logits[1:]:  # a batch of another size may sum in another order: float rounding only
        torch.testing.assert_close(other, logits[0], rtol=1e-5, atol=1e-6)
    accuracies = {evaluate(method, split, task.normalize, batch, seed=0) for batch in (1, 7, 40, 1000)}
    assert len(accuracies) == 1


def test_checkpoint_subset_changes_the_curve_only(fake_run, tmp_path):
    args = ("--methods", "noisy", "--budget", "6steps", "--checkpoints", "2", "--inference-runs", "2")
    _, whole_out = fake_run(*args, "--checkpoint-size", "0", out=tmp_path / "whole")
    _, subset_out = fake_run(*args, "--checkpoint-size", "16", out=tmp_path / "subset")
    whole, subset = _records(whole_out)[0], _records(subset_out)[0]
    assert whole["trial_id"] == subset["trial_id"]  # an observation setting, like --checkpoints
    assert whole["checkpoint_size"] == 64 and subset["checkpoint_size"] == 16
    images = [p["test_images"] for p in subset["curve"]]
    assert len(images) >= 2 and set(images[:-1]) == {16} and images[-1] == 64
    assert subset["test_acc_runs"] == whole["test_acc_runs"]  # the final evaluation is untouched
    assert [p["train_loss"] for p in subset["curve"]] == [p["train_loss"] for p in whole["curve"]]
    caption = (subset_out / "time_to_accuracy.md").read_text()
    assert "a fixed, stratified subset of 16 of the 64 test images" in caption
    assert "test_images" in (subset_out / "curves.csv").read_text().splitlines()[0]
    assert "the whole test split; the last point" in checkpoint_text([whole])
    curves = load_curves(subset_out)
    assert curves["test_images"].tolist() == images and set(curves["speed"]) == {"eager fp32"}


def test_a_checkpoint_size_below_the_class_count_is_said_to_grow(fake_run, capsys):
    code, out = fake_run("--methods", "linear", "--budget", "3steps", "--checkpoints", "1", "--checkpoint-size", "2")
    assert code == 0 and _records(out)[0]["checkpoint_size"] == 4  # one image of each of the 4 classes
    assert ("note: --checkpoint-size 2: the subset keeps at least one image of each of the 4 classes, so "
            "checkpoints evaluate 4 or more") in capsys.readouterr().err


def test_train_accuracy_uses_at_most_twice_the_test_split(fake_run):
    code, out = fake_run("--methods", "linear", "--budget", "3steps", "--train-accuracy")
    record = _records(out)[0]
    assert code == 0 and record["train_acc_size"] == 2 * record["test_size"] == 128
    assert 0 <= record["train_acc"] <= 100


def test_evaluation_that_runs_out_of_memory_retries_with_halved_batches(fake_run, tmp_path):
    args = ("--budget", "4steps", "--checkpoints", "1")
    code, out = fake_run("--methods", "out_of_memory", *args, out=tmp_path / "oom")
    _, reference_out = fake_run("--methods", "linear", *args, out=tmp_path / "linear")
    record, reference = _records(out)[0], _records(reference_out)[0]
    assert code == 0 and record["status"] == "ok"
    # a deterministic method predicts in the feature batches: 64 -> 32 -> 16 images (sampling: 1000 -> 250)
    assert (record["eval_feature_batch_size"], record["eval_batch_size"]) == (16, 250)
    assert [w for w in record["warnings"] if "ran out of device memory" in w] != []
    assert record["test_acc"] == reference["test_acc"]
    assert [p["test_acc"] for p in record["curve"]] == [p["test_acc"] for p in reference["curve"]]


def test_training_goes_on_in_training_mode_after_an_evaluation_ran_out_of_memory(fake_run):
    import fake_plugins

    fake_plugins.OutOfMemoryNotesModes.modes = []
    code, out = fake_run("--methods", "out_of_memory_notes_modes", "--budget", "12steps", "--checkpoints", "3")
    record = _records(out)[0]
    assert code == 0 and record["status"] == "ok"
    assert [w for w in record["warnings"] if "ran out of device memory" in w] != []  # a checkpoint was retried
    modes = fake_plugins.OutOfMemoryNotesModes.modes
    assert len(modes) >= 12 and all(modes)  # no step after the retried checkpoint ran in eval mode


def test_cuda_sampling_from_cached_features_takes_a_fixed_batch_whatever_memory_is_free(monkeypatch):
    """A stochastic method's draws depend on its batch: a seed must give the same accuracy on every GPU."""
    cuda = evaluation_plan.torch.cuda
    image = evaluation_plan.image_bytes_estimate((3, 32, 32))
    monkeypatch.setattr(cuda, "memory_allocated", lambda device=None: 0)
    monkeypatch.setattr(cuda, "memory_reserved", lambda device=None: 0)
    plans = []
    for images_that_fit in (2000, 9000):
        free = int(images_that_fit * image / evaluation_plan.CUDA_FREE_MEMORY_SHARE)
        monkeypatch.setattr(cuda, "mem_get_info", lambda device=None, free=free: (free, 2 * free))
        plans.append((evaluation_batches("cuda", (3, 32, 32), samples_features=True),
                      evaluation_batches("cuda", (3, 32, 32))))
    (small_gpu, small_whole), (large_gpu, large_whole) = plans
    assert small_gpu.stochastic == large_gpu.stochastic == evaluation_plan.CUDA_FEATURE_SAMPLING_BATCH
    assert (small_gpu.deterministic, large_gpu.deterministic) == (2000, 9000)  # backbone passes: memory-sized
    assert (small_whole.stochastic, large_whole.stochastic) == (2000, 9000)  # a whole predict holds images
    assert evaluation_batches("cpu", (3, 32, 32), samples_features=True).stochastic == CPU_EVAL_BATCH


def test_every_built_in_stochastic_method_samples_from_cached_features():
    from noprop_bench.method import splits_features
    from noprop_bench.plugins import load_plugins

    stochastic = {name: cls for name, cls in load_plugins().methods.items() if cls.stochastic}
    assert {"noprop_ct", "noprop_dt", "noprop_fm", "adjoint", "backprop_dt"} <= set(stochastic)
    assert all(splits_features(cls) for cls in stochastic.values())
    assert not splits_features(Method)


def test_time_to_accuracy_warns_when_trials_ran_with_different_checkpoints(fake_run, tmp_path):
    """--checkpoints is an observation setting (not in the trial id): a run resumed with another value keeps
    its finished trials, whose curves then have another resolution."""
    out = tmp_path / "run"
    fake_run("--methods", "linear", "--budget", "6steps", "--checkpoints", "0", out=out)
    fake_run("--methods", "linear,noisy", "--budget", "6steps", "--checkpoints", "3", out=out)
    records = _records(out)
    assert [r["checkpoints"] for r in records] == [0, 3]
    caption = (out / "time_to_accuracy.md").read_text()
    assert "The trials here ran with different --checkpoints (0, 3)" in caption
    fake_run("--methods", "linear", "--budget", "6steps", "--checkpoints", "0", out=tmp_path / "alone")
    assert "different --checkpoints" not in (tmp_path / "alone" / "time_to_accuracy.md").read_text()
