"""Epoch budgets: Nepochs passes over the training split, and --budget paper (the paper's epochs per method)."""

import json
from types import SimpleNamespace

import pytest

from noprop_bench.errors import UsageError
from noprop_bench.presets import paper_budget
from noprop_bench.report.records import comparable_groups, settings_text
from noprop_bench.run.budget import Budget


def _records(out):
    return [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]


def dataset(name, classes=10, shape=(3, 32, 32)):
    return SimpleNamespace(name=name, num_classes=classes, image_shape=shape)


def test_epoch_budget_parses_and_counts_passes_over_the_training_split():
    budget = Budget.parse("20epochs")
    assert (budget.amount, budget.unit, str(budget)) == (20, "epochs", "20epochs")
    assert budget.progress(1e9, samples=5000, steps=1, train_size=1000) == 0.25
    assert Budget.parse("100epochs (paper)") == Budget(100, "epochs", "paper")
    with pytest.raises(UsageError, match="whole number"):
        Budget.parse("1.5epochs")
    with pytest.raises(ValueError):
        budget.progress(0, 10, 1)


@pytest.mark.parametrize("method,data,epochs", [
    ("backprop_dt", dataset("mnist5k", shape=(1, 28, 28)), 100),
    ("adjoint", dataset("fashion_mnist", shape=(1, 28, 28)), 2),
    ("noprop_ct", dataset("imagefolder", shape=(1, 28, 28)), 100),  # an MNIST-like folder
    ("noprop_ct", dataset("cifar10"), 500),
    ("noprop_fm", dataset("imagefolder"), 500),  # another 10-class dataset
    ("noprop_fm", dataset("cifar100", classes=100), 1000),
    ("noprop_dt", dataset("cifar100", classes=100), 150),
    ("adjoint", dataset("cifar100", classes=100), 4),
])
def test_paper_budget_is_the_papers_epochs_for_the_dataset_kind(method, data, epochs):
    assert paper_budget(method, data) == Budget(epochs, "epochs", "paper")


def test_paper_budget_refuses_what_the_paper_never_ran():
    with pytest.raises(UsageError, match="no epochs for method 'thirdparty'"):
        paper_budget("thirdparty", dataset("cifar10"))
    with pytest.raises(UsageError, match="200 classes"):
        paper_budget("noprop_ct", dataset("tiny_imagenet", classes=200, shape=(3, 64, 64)))


def test_epochs_budget_runs_whole_passes(fake_run):
    code, out = fake_run("--methods", "linear", "--budget", "2epochs", "--batch-size", "64")
    assert code == 0
    record = _records(out)[0]
    assert record["budget"] == "2epochs" and record["budget_unit"] == "epochs"
    assert record["samples"] == 2 * 256 and record["epochs"] == 2.0 and record["train_seconds"] > 0


def test_paper_budget_trials_share_one_table():
    records = [{"method": m, "method_label": label, "budget": budget, "budget_unit": "epochs", "backbone": "noprop_cnn",
                "batch_size": 128, "row_label": f"{label} (one-hot)", "environment": {"device_name": "cpu"},
                "dataset": "mnist5k", "seed": 0}
               for m, label, budget in (("noprop_ct", "NoProp-CT", "100epochs (paper)"),
                                        ("adjoint", "Adjoint", "2epochs (paper)"))]
    groups = comparable_groups(records)
    assert len(groups) == 1
    assert "the paper's epochs per method (NoProp-CT 100epochs, Adjoint 2epochs)" in settings_text(groups[0])
    assert len(comparable_groups(records + [{**records[0], "budget": "100epochs"}])) == 2
    cifar = [{**r, "dataset": "cifar10", "dataset_label": "CIFAR-10",
              "budget": {"noprop_ct": "500epochs (paper)", "adjoint": "4epochs (paper)"}[r["method"]]} for r in records]
    assert ("the paper's epochs per method (mnist5k: NoProp-CT 100epochs, Adjoint 2epochs; CIFAR-10: NoProp-CT "
            "500epochs, Adjoint 4epochs)") in settings_text(records + cifar)  # which epochs go with which dataset


def test_paper_budget_for_an_unknown_method_is_a_usage_error(fake_run):
    with pytest.raises(UsageError, match="--budget paper"):
        fake_run("--methods", "linear", "--budget", "paper")


def test_caption_says_what_an_epoch_meant_to_each_block_of_a_one_block_per_step_method():
    common = {"budget": "100epochs (paper)", "budget_unit": "epochs", "backbone": "noprop_cnn", "batch_size": 128,
              "environment": {"device_name": "cpu"}, "dataset": "mnist5k"}
    records = [{**common, "method": "noprop_dt", "method_label": "NoProp-DT", "row_label": "NoProp-DT (one-hot)",
                "seed": seed,
                "method_metrics": {"blocks_trained_per_step": 1, "passes_per_block": [10.0] * 9 + [passes]}}
               for seed, passes in ((0, 10.0), (1, 8.0))]
    parallel = {**common, "method": "noprop_dt", "method_label": "NoProp-DT parallel", "seed": 0,
                "method_metrics": {"blocks_trained_per_step": 10, "passes_per_block": [100.0] * 10}}
    backprop = {**common, "method": "backprop", "method_label": "Backprop", "seed": 0, "method_metrics": {}}
    text = settings_text(records + [parallel, backprop])
    assert text.endswith("passes over the training split per block, on average: NoProp-DT (one-hot) 9.90 (of 10 "
                         "blocks).")
    assert "per block" not in settings_text([parallel, backprop])  # every block saw every batch
    # two rows of one method and label: the caption names the row it speaks of, as the table does
    sequential = [{**r, "params": {"schedule": "sequential"}} for r in records]
    both = sequential + [{**parallel, "method_label": "NoProp-DT", "row_label": "NoProp-DT (one-hot)",
                          "params": {"schedule": "parallel"}}]
    assert settings_text(both).endswith("on average: NoProp-DT (one-hot) [schedule=sequential] 9.90 (of 10 blocks).")
    seconds = [{**r, "budget": "60", "budget_unit": "seconds"} for r in records]
    assert "per block" not in settings_text(seconds)  # a clock budget makes no claim about epochs
