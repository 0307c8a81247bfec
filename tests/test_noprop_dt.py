"""NoProp-DT: schedule, block isolation, section-8 bugs that apply to DT, block order, bad input, end to end."""

import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from noprop_bench import UsageError
from noprop_bench_plugins.methods.noprop_dt import NoPropDT
from noprop_bench_plugins.parts.noprop_dt_block import CosineSchedule
from noprop_helpers import (first_batch, fit_on_mnist5k, held_out_accuracy, mnist_shaped_task,
                            predictions_whole_and_shared)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one thread is faster, and immune to a crowded CI machine."""


def small_backbone():
    """A one-layer image path: these tests are about how blocks learn, and CI time is short."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU())


def make_task(images=None, labels=None, backbone=None, features=64):
    return mnist_shaped_task(images, labels, make_backbone=backbone or small_backbone, features=features)


def make_method(task=None, **params):
    torch.manual_seed(0)
    return NoPropDT(task or make_task(), **NoPropDT.resolve_params(params))


def state(module):
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


# -- schedule -------------------------------------------------------------------------------------

@pytest.mark.parametrize("blocks", [1, 2, 10, 1000])
def test_schedule_increases_towards_the_label_with_positive_weights(blocks):
    s = CosineSchedule(blocks)
    assert (s.abar[1:] > s.abar[:-1]).all(), "abar must increase in t (z_0 noise, z_T label)"
    assert (s.snr_delta > 0).all(), "SNR(t) - SNR(t-1) must be positive: a negative weight is gradient ascent"
    assert s.abar[0].item() == pytest.approx(1e-3) and s.abar[-1].item() == pytest.approx(0.999)
    for name in ("a", "b", "c"):
        assert (getattr(s, name)[1:] > 0).all()


def test_schedule_coefficients_follow_section_2_1():
    s = CosineSchedule(10)
    abar, alpha = s.abar.double(), s.alpha.double()
    for t in range(11):  # abar_t = prod_{s=t}^{T} alpha_s
        assert abar[t].item() == pytest.approx(alpha[t:].prod().item(), rel=1e-5)
    # the posterior step carries the q-marginal mean along: a_t + b_t sqrt(abar_{t-1}) = sqrt(abar_t)
    mean = s.a[1:] + s.b[1:] * s.abar[:-1].sqrt()
    torch.testing.assert_close(mean, s.abar[1:].sqrt())
    # and its variance: b_t^2 (1 - abar_{t-1}) + c_t = 1 - abar_t
    torch.testing.assert_close(s.b[1:] ** 2 * (1 - s.abar[:-1]) + s.c[1:], 1 - s.abar[1:])


def test_inference_with_a_perfect_block_lands_on_the_label(monkeypatch):
    task = make_task()
    method = make_method(task, embedding="learned").eval()
    x, y = first_batch(task, 16)
    for block in method.blocks:
        monkeypatch.setattr(block, "logits", lambda f, z: 1e4 * F.one_hot(y, 10).float())
    captured = {}
    monkeypatch.setattr(method.classifier, "forward", lambda z: captured.setdefault("z", z))
    with torch.inference_mode():
        method.predict(x, noise=False)
    u_y = method.embedding.weight[y].detach()
    # from z_0 ~ N(0, I) the noise left at z_T is b_T...b_1 z_0, tiny; the mean is a-weighted u_y
    assert (captured["z"] - u_y).norm(dim=1).max() < 0.05 * u_y.norm(dim=1).min()


# -- block isolation --------------------------------------------------------------------------------

@pytest.mark.parametrize("embedding", ["one-hot", "learned", "prototype"])
def test_a_step_of_block_t_changes_no_other_block(embedding, monkeypatch):
    task = make_task()
    method = make_method(task, embedding=embedding, schedule="random")
    x, y = first_batch(task)
    for t in (1, 4, 10):
        monkeypatch.setattr(method, "next_block", lambda t=t: t)
        before = [state(block) for block in method.blocks]
        method.zero_grad(set_to_none=True)
        method.train_step(x, y)
        for i, block in enumerate(method.blocks, start=1):
            after = state(block)
            changed = [name for name in after if not torch.equal(after[name], before[i - 1][name])]
            if i == t:
                assert changed, f"block {t} did not learn"
            else:
                assert not changed, f"a step of block {t} changed block {i}: {changed}"
                assert all(p.grad is None for p in block.parameters()), f"block {i} got a gradient"


def test_block_inputs_are_detached(monkeypatch):
    task = make_task()
    method = make_method(task, embedding="learned")
    seen = []
    block = method.blocks[0]
    logits = block.logits
    monkeypatch.setattr(block, "logits", lambda f, z: seen.append(z) or logits(f, z))
    x, y = first_batch(task)
    method.block_losses(1, x, y)["loss"].backward()
    assert seen and not seen[0].requires_grad and seen[0].grad_fn is None


def test_each_optimizer_holds_its_own_parameters_and_all_are_covered():
    task = make_task()
    method = make_method(task, embedding="learned")
    groups = [{id(p) for g in opt.param_groups for p in g["params"]}
              for opt in [*method.block_optimizers, method.shared_optimizer]]
    for block, ids in zip(method.blocks, groups):
        assert ids == {id(p) for p in block.parameters()}
    assert groups[-1] == {id(p) for p in [*method.classifier.parameters(), method.embedding.weight]}
    assert sum(map(len, groups)) == len({i for ids in groups for i in ids}) == len(list(method.parameters()))


@pytest.mark.parametrize("embedding", ["one-hot", "learned", "prototype"])
def test_every_parameter_gets_a_gradient_from_its_blocks_loss(embedding):
    task = make_task()
    method = make_method(task, embedding=embedding)
    x, y = first_batch(task)
    for t in range(1, method.T + 1):
        method.block_losses(t, x, y)["loss"].backward()
    silent = [name for name, p in method.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not silent, f"parameters without gradient: {silent}"


# -- section 8 bugs ----------------------------------------------------------------------------------

def test_noised_latent_has_mean_sqrt_abar_u_y(monkeypatch):
    task = make_task()
    method = make_method(task, embedding="learned")
    seen = []
    logits = method.blocks[4].logits
    monkeypatch.setattr(method.blocks[4], "logits", lambda f, z: seen.append(z) or logits(f, z))
    monkeypatch.setattr(torch, "randn_like", torch.zeros_like)
    x, y = first_batch(task)
    method.block_losses(5, x, y)
    abar = method.schedule.abar[4]
    u_y = method.embedding.weight[y].detach()
    torch.testing.assert_close(seen[0], abar.sqrt() * u_y)
    assert not torch.allclose(seen[0], abar * u_y)


def test_cross_entropy_is_applied_to_logits(monkeypatch):
    task = make_task()
    method = make_method(task)
    with torch.no_grad():
        method.classifier.weight.copy_(50 * torch.eye(10))
        method.classifier.bias.zero_()
    monkeypatch.setattr(torch, "randn_like", torch.zeros_like)
    x, y = first_batch(task)
    ce = method.block_losses(3, x, y)["ce"]
    assert ce.item() < 0.1, "a softmax before the cross-entropy would bound it below by 1.46"
    z_T = method.schedule.abar[-1].sqrt() * method.embedding.weight[y]
    torch.testing.assert_close(ce, F.cross_entropy(method.classifier(z_T), y))


def test_one_backbone_pass_per_step_only_the_active_blocks():
    calls = []

    class Counted(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = small_backbone()
            self.index = len(created)
            created.append(self)

        def forward(self, x):
            calls.append(self.index)
            return self.net(x)

    created = []
    task = make_task(backbone=Counted)
    method = make_method(task)
    x, y = first_batch(task)
    method.train_step(x, y)
    assert calls == [0], "block 1 trains first and only its backbone runs"
    calls.clear()
    with torch.inference_mode():
        method.eval().predict(x)
    assert calls == list(range(10)), "inference runs each block's own backbone once"


# -- block order and counts ---------------------------------------------------------------------------

def test_sequential_cycles_blocks_one_pass_each_and_counts_passes():
    task = make_task()  # 40 training images
    method = make_method(task)
    x, y = first_batch(task, 20)
    order = []
    for _ in range(44):
        order.append(method.next_block())
        method.train_step(x, y)
    assert order == [t for t in range(1, 11) for _ in range(2)] * 2 + [1, 1, 2, 2]
    metrics = method.trial_metrics()
    assert metrics["block_steps"] == [6, 6] + [4] * 8
    assert metrics["passes_per_block"] == [3.0, 3.0] + [2.0] * 8
    json.dumps(metrics)


def test_block_samples_sets_the_pass_length_and_random_draws_blocks():
    task = make_task()
    method = make_method(task, block_samples=10)
    x, y = first_batch(task, 10)
    order = []
    for _ in range(3):
        order.append(method.next_block())
        method.train_step(x, y)
    assert order == [1, 2, 3]
    method = make_method(task, schedule="random")
    for _ in range(30):
        method.train_step(x, y)
    steps = method.trial_metrics()["block_steps"]
    assert sum(steps) == 30 and sum(n > 0 for n in steps) >= 5


# -- a trained model ---------------------------------------------------------------------------------

def test_trains_on_mnist5k_above_chance():
    method, x, y = fit_on_mnist5k(make_task, make_method, steps=400, batch_size=64, schedule="random")
    accuracy = {noise: held_out_accuracy(method, x, y, noise=noise) for noise in (True, False)}
    # chance is 0.1; 40 steps per block reach about 0.75 with the noise term and 0.88 without here
    assert min(accuracy.values()) > 0.6, accuracy


# -- host hooks and bad input -------------------------------------------------------------------------

def test_settings_for_the_host():
    method = make_method()
    assert method.sweep_settings() == [{"noise": True}, {"noise": False}]
    assert method.diagnostic_settings() == {"last_block_only": {"start_block": 10}}
    assert NoPropDT.family == "discrete-time" and NoPropDT.stochastic


@pytest.mark.parametrize("params, expected", [
    ({"embedding": "onehot"}, "embedding='onehot' is not one of one-hot, learned, prototype"),
    ({"schedule": "shuffled"}, "schedule='shuffled' is not one of sequential, random"),
    ({"blocks": "0"}, "blocks=0 must be a whole number of at least 1"),
    ({"dim": "0"}, "dim=0 must be a whole number of at least 1"),
    ({"block_samples": "-1"}, "block_samples=-1 must be a whole number of at least 0"),
    ({"eta": "-0.1"}, "eta=-0.1 must be >= 0"),
    ({"abar_min": "0.5", "abar_max": "0.4"}, "needs 0 < abar_min < abar_max < 1"),
    ({"abar_max": "1.0"}, "needs 0 < abar_min < abar_max < 1"),
    ({"noise": "maybe"}, "noise='maybe': expected true/false"),
])
def test_bad_parameters_name_what_is_accepted(params, expected):
    with pytest.raises(UsageError, match=expected):
        NoPropDT.resolve_params(params)


def test_bad_predict_settings_name_what_is_accepted():
    method = make_method().eval()
    x, _ = first_batch(method.task, 4)
    with pytest.raises(UsageError, match=r"start_block=11 must be a whole number in 1\.\.10"):
        method.predict(x, start_block=11)
    with pytest.raises(UsageError, match="noise='no' must be true or false"):
        method.predict(x, noise="no")


def test_cli_end_to_end(tmp_path):
    from noprop_bench.cli import run

    out = tmp_path / "out"
    code = run(["--methods", "noprop_dt[blocks=3,block_samples=256]", "--budget", "1024samples", "--seeds", "1",
                "--checkpoints", "1", "--inference-runs", "1", "--out", str(out)])
    assert code == 0
    record = json.loads((out / "trials.jsonl").read_text().splitlines()[-1])
    assert record["status"] == "ok" and record["method"] == "noprop_dt"
    metrics = record["method_metrics"]
    assert metrics["block_steps"] == [4, 2, 2] and metrics["schedule"] == "sequential"
    assert sum(metrics["passes_per_block"]) == pytest.approx(record["epochs"])
    assert "NoProp-DT (one-hot)" in (out / "table1.md").read_text()


@pytest.mark.parametrize("setting", [{}, {"noise": False}, {"start_block": 10}])
def test_shared_block_features_give_exactly_equation_3(setting):
    """The harness computes every block's image path once; the chain from them is Eq. 3 bit for bit."""
    method = make_method().eval()
    x, _ = first_batch(method.task, 8)
    s, W, noise = method.schedule, method.embedding.weight, setting.get("noise", True)
    with torch.inference_mode():
        torch.manual_seed(3)
        z = torch.randn(len(x), W.shape[1])
        for t in range(setting.get("start_block", 1), method.T + 1):
            block = method.blocks[t - 1]
            z = s.a[t] * block(block.features(x), z, W) + s.b[t] * z
            if noise:
                z = z + s.c[t].sqrt() * torch.randn_like(z)
        reference = method.classifier(z)
    whole, shared = predictions_whole_and_shared(method, x, **setting)
    assert method.reuses_features() and method.features(x).shape == (8, method.T, 256)
    assert torch.equal(whole, reference) and torch.equal(shared, reference)


def test_compiled_training_builds_one_graph_for_every_block():
    """--compile wraps the per-block loss: moving to another block must not recompile (on the clock)."""
    from torch._dynamo.utils import counters
    from noprop_bench.run.speed_settings import SpeedSettings, apply_speed_settings

    method = make_method(blocks=4, block_samples=8).train()
    torch._dynamo.reset()
    counters.clear()
    applied = apply_speed_settings(method, SpeedSettings(compile="default"), "cpu")
    assert applied.record()["compiled"] == ["losses_of_block", "predict_from_features"]
    x, y = first_batch(method.task, 8)
    blocks_trained = []
    for step in range(6):
        blocks_trained.append(method.next_block())
        assert torch.isfinite(method.train_step(x, y)["loss"])
        if step == 0:
            graphs_after_first_block = counters["stats"]["unique_graphs"]
    assert blocks_trained == [1, 2, 3, 4, 1, 2]
    assert graphs_after_first_block >= 1 and counters["stats"]["unique_graphs"] == graphs_after_first_block
    assert applied.record()["compile_fallbacks"] == {}
    torch._dynamo.reset()
