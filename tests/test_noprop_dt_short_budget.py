"""NoProp-DT under short budgets: a block with less than one pass is recorded and printed as a warning."""

import json

import torch
from torch import nn

from noprop_bench_plugins.methods.noprop_dt import NoPropDT
from noprop_helpers import first_batch, mnist_shaped_task


def make_method(**params):
    task = mnist_shaped_task(make_backbone=lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.ReLU()),
                             features=8)
    torch.manual_seed(0)
    return NoPropDT(task, **NoPropDT.resolve_params({"blocks": 3, **params}))


def train(method, steps, batch=8):
    x, y = first_batch(method.task, batch)
    for _ in range(steps):
        method.train_step(x, y)


def test_blocks_short_of_one_pass_are_named():
    method = make_method()  # 40 training images: one pass is 5 steps of 8
    train(method, 7)  # block 1: 5 steps, block 2: 2 steps, block 3: none
    warnings = method.trial_metrics()["warnings"]
    assert len(warnings) == 1 and warnings[0].startswith("blocks 2, 3 of 3 got less than one pass")
    assert "1.00, 0.40, 0.00" in warnings[0]


def test_the_epochs_it_advises_give_every_block_a_pass():
    """A sequential pass ends on a whole batch, so it runs past the split: with 40 images and batches of 16 a
    pass is 48 samples, and 3 epochs (120 samples, 8 batches) leave block 3 short; 4 epochs (10 batches) do not."""
    method = make_method()
    train(method, 8, batch=16)
    assert method.trial_metrics()["warnings"][0].endswith("a budget of at least 4 epochs gives every block one")
    train(method, 2, batch=16)
    assert method.trial_metrics()["warnings"] == []
    for schedule, epochs in (("random", 3), ("parallel", 1)):
        assert make_method(schedule=schedule).epochs_for_one_pass_each() == epochs


def test_no_warning_once_every_block_had_a_pass():
    method = make_method()
    train(method, 15)
    assert method.trial_metrics()["warnings"] == []


def test_the_run_records_and_prints_the_warning(fake_run, capsys):
    code, out = fake_run("--methods", "noprop_dt[blocks=2]", "--budget", "2steps", "--checkpoints", "0",
                         "--batch-size", "64",
                         "--inference-runs", "1")
    assert code == 0
    record = json.loads((out / "trials.jsonl").read_text().splitlines()[-1])
    # 256 training images, 2 steps of 64: block 1 saw half a pass, block 2 none
    assert record["method_metrics"]["warnings"][0].startswith("blocks 1, 2 of 2 got less than one pass")
    assert "warning: NoProp-DT (one-hot) [blocks=2] seed 0: blocks 1, 2 of 2" in capsys.readouterr().err
