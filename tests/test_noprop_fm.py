"""NoProp-FM: the velocity, the path, the anchor, nearest-embedding prediction, solvers, bad input, end to end."""

import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from noprop_bench import UsageError
from noprop_bench_plugins.methods.noprop_fm import NoPropFM
from noprop_helpers import (first_batch, fit_on_mnist5k, held_out_accuracy, mnist_shaped_task,
                            predictions_whole_and_shared)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one thread is faster, and immune to a crowded CI machine."""


def small_backbone():
    """A one-layer image path: these tests are about the flow, and CI time is short."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU())


def make_task(images=None, labels=None, backbone=None):
    return mnist_shaped_task(images, labels, make_backbone=backbone or small_backbone, features=128)


def make_method(task=None, **params):
    torch.manual_seed(0)
    return NoPropFM(task or make_task(), **NoPropFM.resolve_params(params))


# -- training objective ------------------------------------------------------------------------------

@pytest.mark.parametrize("embedding", ["one-hot", "learned", "prototype"])
def test_every_parameter_is_optimised_and_gets_a_gradient(embedding):
    task = make_task()
    method = make_method(task, embedding=embedding)
    in_optimizer = {id(p) for group in method.optimizer.param_groups for p in group["params"]}
    named = dict(method.named_parameters())
    assert {id(p) for p in named.values()} == in_optimizer
    assert any(name.startswith("model.backbone.") for name in named)
    assert (method.classifier is None) == (embedding == "one-hot"), "an anchor classifier only for learned ones"
    x, y = first_batch(task)
    method.losses(x, y)["loss"].backward()
    silent = [name for name, p in named.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not silent, f"parameters without gradient: {silent}"


def test_velocity_is_logits_times_embedding_without_softmax(monkeypatch):
    task = make_task()
    method = make_method(task, embedding="learned")
    x, y = first_batch(task)
    logits = 3.0 * F.one_hot(y, 10).float() - 1.0
    monkeypatch.setattr(method.model, "logits", lambda f, z, t: logits)
    monkeypatch.setattr(torch, "randn_like", torch.zeros_like)  # z_0 = 0: the target is u_y
    W = method.embedding.weight.detach()
    terms = method.losses(x, y)
    expected = (logits @ W - W[y]).pow(2).sum(dim=1).mean()
    torch.testing.assert_close(terms["flow"], expected)
    assert not torch.allclose(terms["flow"], (logits.softmax(1) @ W - W[y]).pow(2).sum(dim=1).mean())


def test_path_is_the_straight_line_from_noise_to_the_label(monkeypatch):
    task = make_task()
    method = make_method(task, embedding="learned", sigma=0.5)
    seen = {}
    logits = method.model.logits

    def spy(features, z, time_features):
        seen["z"] = z.detach().clone()
        return logits(features, z, time_features)

    monkeypatch.setattr(method.model, "logits", spy)
    monkeypatch.setattr(torch, "rand", lambda n, device=None: torch.full((n,), 0.25))
    monkeypatch.setattr(torch, "randn_like", torch.ones_like)  # z_0 = 1 and the sigma noise = 1
    x, y = first_batch(task)
    method.losses(x, y)
    u_y = method.embedding.weight[y].detach()
    torch.testing.assert_close(seen["z"], 0.25 * u_y + 0.75 + 0.5)


def test_anchor_is_cross_entropy_on_logits_of_the_extrapolated_label(monkeypatch):
    task = make_task()
    method = make_method(task, embedding="learned")
    x, y = first_batch(task)
    monkeypatch.setattr(torch, "rand", lambda n, device=None: torch.full((n,), 0.4))
    monkeypatch.setattr(torch, "randn_like", torch.zeros_like)
    W = method.embedding.weight.detach()
    with torch.no_grad():
        v = method.velocity(method.model.features(x), 0.4 * W[y], method.model.time_features(torch.full((32,), 0.4)))
        anchor = method.losses(x, y)["anchor"]
    torch.testing.assert_close(anchor, F.cross_entropy(method.classifier(0.4 * W[y] + 0.6 * v), y))
    assert "anchor" not in make_method(task).losses(x, y), "one-hot embeddings have no anchor"


# -- inference ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_exact_velocity_carries_z0_onto_the_label(solver, monkeypatch):
    task = make_task()
    method = make_method(task).eval()
    x, y = first_batch(task, 16)
    torch.manual_seed(3)
    z_0 = torch.randn(16, 10)
    u_y = F.one_hot(y, 10).float()
    monkeypatch.setattr(method.model, "logits", lambda f, z, t: u_y - z_0)  # one-hot: v = logits
    with torch.inference_mode():
        torch.manual_seed(3)
        z_1 = method.integrate(method.model.features(x), solver, 7)
    torch.testing.assert_close(z_1, u_y)


def test_prediction_is_the_nearest_class_embedding(monkeypatch):
    task = make_task()
    method = make_method(task, embedding="learned").eval()
    x, y = first_batch(task, 20)
    W = method.embedding.weight.detach()
    z_1 = W[y] + 0.05 * torch.randn(20, 20)
    monkeypatch.setattr(method, "integrate", lambda f, solver, steps: z_1)
    with torch.inference_mode():
        logits = method.predict(x)
    assert (logits.argmax(1) == y).all()
    torch.testing.assert_close(logits, -(z_1[:, None] - W[None]).pow(2).sum(dim=2), atol=1e-4, rtol=1e-4)


def test_one_backbone_pass_per_step_and_per_test_batch():
    calls = []

    class Counted(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = small_backbone()

        def forward(self, x):
            calls.append(len(x))
            return self.net(x)

    task = make_task(backbone=Counted)
    method = make_method(task)
    x, y = first_batch(task)
    method.train_step(x, y)
    assert calls == [len(x)]
    calls.clear()
    with torch.inference_mode():
        method.eval().predict(x, solver="heun", steps=9)
    assert calls == [len(x)]


def test_euler_and_heun_converge_to_each_other():
    task = make_task()
    method = make_method(task, embedding="learned").eval()
    x, _ = first_batch(task)
    gaps = []
    with torch.inference_mode():
        features = method.model.features(x)
        for steps in (4, 40, 400):
            ends = []
            for solver in ("euler", "heun"):
                torch.manual_seed(5)
                ends.append(method.integrate(features, solver, steps))
            gaps.append((ends[0] - ends[1]).norm(dim=1).mean().item())
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < 0.05 * gaps[0]


def test_trains_on_mnist5k_above_chance():
    method, x, y = fit_on_mnist5k(make_task, make_method, steps=300, batch_size=64, embedding="learned")

    def accuracy(**setting):
        return held_out_accuracy(method, x, y, **setting)

    # chance is 0.1; 300 steps reach about 0.85 here
    assert accuracy(solver="euler", steps=20) > 0.6
    assert accuracy(solver="heun", steps=5) > 0.6
    assert accuracy(**method.diagnostic_settings()["z_ablation"]) < 0.2


# -- host hooks and bad input -------------------------------------------------------------------------

def test_settings_for_the_host():
    method = make_method(eval_solver="heun", eval_steps=7, sweep_steps="2,40")
    assert method.checkpoint_setting() == {"solver": "heun", "steps": 7}
    assert method.sweep_settings() == [{"solver": s, "steps": n} for s in ("euler", "heun") for n in (2, 40)]
    assert make_method().checkpoint_setting() == {"solver": "euler", "steps": 20}
    assert method.diagnostic_settings() == {"z_ablation": {"ablate_z": True}}
    assert NoPropFM.family == "continuous-time" and NoPropFM.stochastic


@pytest.mark.parametrize("params, expected", [
    ({"embedding": "onehot"}, "embedding='onehot' is not one of one-hot, learned, prototype"),
    ({"solver": "stochastic"}, "solver='stochastic' is not one of euler, heun"),
    ({"eval_solver": "rk4"}, "eval_solver='rk4' is not one of euler, heun"),
    ({"steps": "0"}, "steps=0 must be a whole number of at least 1"),
    ({"eval_steps": "-2"}, "eval_steps=-2 must be a whole number of at least 1"),
    ({"sweep_steps": "2,0"}, "expected step counts of at least 1, in brackets on the command line"),
    ({"sigma": "-1"}, "sigma=-1.0 must be >= 0"),
    ({"time_dim": "63"}, "time_dim=63 must be an even number"),
])
def test_bad_parameters_name_what_is_accepted(params, expected):
    with pytest.raises(UsageError, match=expected):
        NoPropFM.resolve_params(params)


def test_bad_predict_settings_name_what_is_accepted():
    method = make_method().eval()
    x, _ = first_batch(method.task, 4)
    with pytest.raises(UsageError, match="unknown solver 'rk4'; accepted: euler, heun"):
        method.predict(x, solver="rk4")
    with pytest.raises(UsageError, match="steps=0 must be a whole number of at least 1"):
        method.predict(x, steps=0)


def test_cli_end_to_end(tmp_path):
    from noprop_bench.cli import run

    out = tmp_path / "out"
    code = run(["--methods", "noprop_fm[embedding=learned,steps=5,eval_steps=2]", "--budget", "1024samples",
                "--seeds", "1", "--checkpoints", "1", "--inference-runs", "1", "--out", str(out)])
    assert code == 0
    record = json.loads((out / "trials.jsonl").read_text().splitlines()[-1])
    assert record["status"] == "ok" and record["method"] == "noprop_fm"
    assert record["method_metrics"]["anchor"] is True
    assert "NoProp-FM (dim=20)" in (out / "table1.md").read_text()


def _flow_step_by_step(method, x, solver, steps):
    """z_1 from z_0 ~ N(0, I) by Euler or Heun on v(z, x, t) = logits . W_Embed, each time's embedding computed
    inside the loop."""
    W = method.embedding.weight
    features = method.model.features(x)

    def v(z, t):
        return method.model.logits(features, z, method.model.time_features(torch.tensor([t]))) @ W

    z = torch.randn(len(x), W.shape[1])
    h = 1.0 / steps
    for k in range(steps):
        f0 = v(z, k * h)
        z = z + h * f0 if solver == "euler" else z + 0.5 * h * (f0 + v(z + h * f0, (k + 1) * h))
    return z


@pytest.mark.parametrize("setting", [{}, {"solver": "heun", "steps": 3}, {"ablate_z": True}])
def test_prediction_from_shared_features_is_the_nearest_embedding_of_the_integrated_flow(setting):
    """Both ways into inference (the images, or their cached features) score each class by minus the squared
    distance from z_1, integrated step by step from the images (or fresh noise), to its embedding."""
    task = make_task()
    method = make_method(task).eval()
    x, _ = first_batch(task)
    W = method.embedding.weight
    with torch.inference_mode():
        torch.manual_seed(3)
        z = (torch.randn(len(x), W.shape[1]) if setting.get("ablate_z") else
             _flow_step_by_step(method, x, setting.get("solver", method.params["solver"]),
                                setting.get("steps", method.params["steps"])))
        reference = -((z[:, None, :] - W[None, :, :]) ** 2).sum(dim=2)
    whole, shared = predictions_whole_and_shared(method, x, **setting)
    # the grid's times are computed once, with linspace, and the distances by cdist: float rounding only
    torch.testing.assert_close(whole, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared, reference, rtol=1e-5, atol=1e-5)


def test_the_record_counts_the_label_paths_backbone_passes():
    for embedding, passes in (("one-hot", (1, 1)), ("prototype", (2, 1 + 2 * 20))):
        metrics = make_method(embedding=embedding, solver="heun", steps=20).trial_metrics()
        assert (metrics["backbone_passes_per_train_step"], metrics["backbone_passes_per_test_batch"]) == passes
