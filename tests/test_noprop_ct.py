"""NoProp-CT: one test per public-code bug of paper.md section 8 that applies to CT, bad input, end to end."""

import json
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from noprop_bench import UsageError
from noprop_bench.backbones import create_backbone
from noprop_bench_plugins.parts.noprop import MonotoneSchedule
from noprop_bench_plugins.methods.noprop_ct import NoPropCT
from noprop_helpers import (first_batch, fit_on_mnist5k, held_out_accuracy, mnist_shaped_task,
                            predictions_whole_and_shared)

GRID = torch.linspace(0.0, 1.0, 201)
TRAIN_STEPS = 300


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread is faster, and far steadier on a crowded CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_task(images=None, labels=None, backbone=None, seed=0):
    return mnist_shaped_task(images, labels, make_backbone=backbone or (lambda: create_backbone("noprop_cnn", 1, 28)),
                             features=256, backbone_name="noprop_cnn", seed=seed)


def make_method(task=None, **params):
    torch.manual_seed(0)
    return NoPropCT(task or make_task(), **NoPropCT.resolve_params(params))


def assert_schedule_ok(schedule):
    with torch.no_grad():
        abar = schedule.abar(GRID)
        assert (abar[1:] > abar[:-1]).all(), "abar must increase in t (z_0 noise, z_1 label)"
        assert (schedule.snr_prime(GRID) > 0).all(), "SNR' must be positive: a negative loss weight is gradient ascent"


def small_backbone():
    """A one-layer image path: the trained-model tests are about the dynamics, and CI time is short."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU())


@pytest.fixture(scope="module")
def trained():
    """NoProp-CT trained briefly on 3000 mnist5k training images; the other 1000 are held out."""
    return fit_on_mnist5k(lambda images, labels: make_task(images, labels, backbone=small_backbone), make_method,
                          steps=TRAIN_STEPS, batch_size=128, gamma0=-3.0, gamma1=3.0)


accuracy = held_out_accuracy


# -- section 8 bugs ---------------------------------------------------------------------------------

def test_schedule_increasing_at_init_after_training_and_under_adversarial_pressure(trained):
    assert_schedule_ok(MonotoneSchedule())
    method, _, _ = trained
    assert_schedule_ok(method.schedule)
    # the diffusion term alone rewards a smaller SNR'; pushing hard on it must not invert the schedule
    schedule = MonotoneSchedule()
    optimizer = torch.optim.Adam(schedule.parameters(), lr=0.2)
    for _ in range(200):
        optimizer.zero_grad()
        schedule.snr_prime(torch.rand(64)).mean().backward()
        optimizer.step()
    assert_schedule_ok(schedule)
    assert schedule.gamma1.item() > schedule.gamma0.item()


def two_pass_schedule(schedule, t):
    """The schedule's definition: gamma(t) = gamma0 + (gamma1 - gamma0) (1 - gbar(t)), gbar the network
    normalised by its own values at 0 and 1, each evaluated on its own."""
    value, slope = schedule._tilde(t)
    start, _ = schedule._tilde(torch.zeros(1))
    end, _ = schedule._tilde(torch.ones(1))
    width = schedule.gamma1 - schedule.gamma0
    span = end[0] - start[0]
    return schedule.gamma0 + width * (1 - (value - start[0]) / span), -width * slope / span


def test_one_pass_of_the_schedule_network_gives_the_definition_and_its_gradients():
    torch.manual_seed(3)
    schedule = MonotoneSchedule(-3.0, 3.0, 64)
    with torch.no_grad():
        for param in schedule.parameters():
            param.add_(0.3 * torch.randn_like(param))  # away from initialisation
    t = torch.rand(257)
    weights = torch.randn(2, 257)
    results = []
    for compute in (schedule, lambda times: two_pass_schedule(schedule, times)):
        schedule.zero_grad()
        gamma, dgamma = compute(t)
        ((weights[0] * gamma).sum() + (weights[1] * dgamma).sum()).backward()
        results.append((gamma.detach(), dgamma.detach(), [p.grad.clone() for p in schedule.parameters()]))
    (gamma, dgamma, grads), (gamma_ref, dgamma_ref, grads_ref) = results
    # float32 rounding alone: the network's sums over its 64 units run over one batch instead of three
    torch.testing.assert_close(gamma, gamma_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dgamma, dgamma_ref, rtol=1e-6, atol=1e-6)
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-6)
    # the ends without the network are exactly what a pass of the network gives at 0 and 1
    with torch.no_grad():
        at_ends, _ = schedule(torch.tensor([0.0, 1.0]))
        assert torch.equal(torch.stack(schedule.endpoints()), at_ends)
        assert schedule.endpoints()[1] == schedule.gamma0


def test_noised_latent_has_mean_sqrt_abar_u_y(monkeypatch):
    task = make_task()
    method = make_method(task, embedding="learned")
    seen = {}
    head = method.model.head

    def spy(features, z, t, embedding):
        seen["z"], seen["t"] = z.detach().clone(), t.detach().clone()
        return head(features, z, t, embedding)

    monkeypatch.setattr(method.model, "head", spy)
    monkeypatch.setattr(torch, "randn_like", torch.zeros_like)  # eps = 0: z_t is exactly the mean
    x, y = first_batch(task)
    method.losses(x, y)
    with torch.no_grad():
        abar = method.schedule.abar(seen["t"]).unsqueeze(1)
        u_y = method.embedding.weight[y]
    torch.testing.assert_close(seen["z"], abar.sqrt() * u_y)
    assert not torch.allclose(seen["z"], abar * u_y)


def test_cross_entropy_is_applied_to_logits(monkeypatch):
    task = make_task()
    method = make_method(task)
    with torch.no_grad():
        method.classifier.weight.copy_(50 * torch.eye(10))
        method.classifier.bias.zero_()
    monkeypatch.setattr(torch, "randn_like", torch.zeros_like)
    x, y = first_batch(task)
    ce = method.losses(x, y)["ce"]
    # a softmax before the cross-entropy would bound it below by -log(e / (e + 9)) = 1.46
    assert ce.item() < 0.1
    with torch.no_grad():
        abar_1 = method.schedule.abar(torch.tensor([1.0]))
        z_1 = abar_1.sqrt() * method.embedding.weight[y]
    torch.testing.assert_close(ce, F.cross_entropy(method.classifier(z_1), y))


@pytest.mark.parametrize("embedding", ["one-hot", "learned", "prototype"])
def test_every_parameter_is_optimised_and_gets_a_gradient(embedding):
    task = make_task()
    method = make_method(task, embedding=embedding)
    in_optimizer = {id(p) for group in method.optimizer.param_groups for p in group["params"]}
    named = dict(method.named_parameters())
    assert {id(p) for p in named.values()} == in_optimizer
    assert any(name.startswith("model.backbone.") for name in named)
    x, y = first_batch(task)
    method.losses(x, y)["loss"].backward()
    silent = [name for name, p in named.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not silent, f"parameters without gradient: {silent}"


def test_the_runs_backbone_is_the_one_used():
    calls = []

    class Marked(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 256))

        def forward(self, x):
            calls.append(len(x))
            return self.net(x)

    task = make_task(backbone=Marked)
    method = make_method(task)
    assert isinstance(method.model.backbone, Marked)
    x, y = first_batch(task)
    method.train_step(x, y)
    assert calls == [len(x)], "one backbone pass per training step"
    calls.clear()
    with torch.inference_mode():
        method.predict(x, solver="heun", steps=7)
    assert calls == [len(x)], "one backbone pass per test batch, whatever the step count"


def test_deterministic_dynamics_transport_the_trained_marginals(monkeypatch):
    """With a perfect u = u_y, the ODE must carry z_0 along sqrt(abar) u_y + sqrt(1 - abar) eps exactly.

    The heuristic drift (u - z) / (1 - abar) of public code fails this.
    """
    task = make_task()
    method = make_method(task, embedding="learned")
    x, y = first_batch(task, 16)
    monkeypatch.setattr(method.model, "logits", lambda f, z, t: 1e4 * F.one_hot(y, 10).float())
    with torch.inference_mode():
        features = method.model.features(x)
        ends = method.schedule.abar(torch.tensor([0.0, 1.0]))
        u_y = method.embedding.weight[y]
        torch.manual_seed(3)
        z_0 = torch.randn(16, method.embedding.dim)
        eps = (z_0 - ends[0].sqrt() * u_y) / (1 - ends[0]).sqrt()
        expected = ends[1].sqrt() * u_y + (1 - ends[1]).sqrt() * eps
        torch.manual_seed(3)
        z_1 = method.integrate(features, "heun", 400)
    torch.testing.assert_close(z_1, expected, atol=2e-3, rtol=1e-3)


def test_euler_and_heun_converge_to_each_other(trained):
    method, x, _ = trained
    x = x[:64]
    with torch.inference_mode():
        features = method.model.features(x)
        gaps = []
        for steps in (4, 40, 400):
            ends = []
            for solver in ("euler", "heun"):
                torch.manual_seed(5)
                ends.append(method.integrate(features, solver, steps))
            gaps.append((ends[0] - ends[1]).norm(dim=1).mean().item())
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < 0.05 * gaps[0]


def test_z_ablation_drops_a_trained_model_to_chance(trained):
    method, x, y = trained
    # chance is 0.1; a few hundred steps of NoProp-CT reach about 0.65-0.75 here
    assert accuracy(method, x, y, solver="heun", steps=10) > 0.5
    assert accuracy(method, x, y, solver="stochastic", steps=50) > 0.5
    assert accuracy(method, x, y, **method.diagnostic_settings()["z_ablation"]) < 0.2


# -- host hooks ---------------------------------------------------------------------------------

def test_settings_for_the_host():
    method = make_method(eval_solver="euler", eval_steps=7, sweep_steps="2,40")
    assert method.checkpoint_setting() == {"solver": "euler", "steps": 7}
    assert method.sweep_settings() == [{"solver": s, "steps": n} for s in ("euler", "heun") for n in (2, 40)]
    assert make_method().sweep_settings()[-1] == {"solver": "heun", "steps": 1000}
    assert method.diagnostic_settings() == {"z_ablation": {"ablate_z": True}}


# -- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("params, expected", [
    ({"embedding": "onehot"}, "embedding='onehot' is not one of one-hot, learned, prototype"),
    ({"solver": "rk4"}, "solver='rk4' is not one of stochastic, euler, heun"),
    ({"eval_solver": "rk4"}, "eval_solver='rk4' is not one of stochastic, euler, heun"),
    ({"steps": "0"}, "steps=0 must be a whole number of at least 1"),
    ({"eval_steps": "-3"}, "eval_steps=-3 must be a whole number of at least 1"),
    ({"sweep_steps": "2,0"}, "expected step counts of at least 1, in brackets on the command line"),
    ({"gamma0": "4", "gamma1": "1"}, "needs gamma1 > gamma0"),
])
def test_bad_parameters_name_what_is_accepted(params, expected):
    with pytest.raises(UsageError, match=expected.replace("(", r"\(")):
        NoPropCT.resolve_params(params)


def test_bad_predict_settings_name_what_is_accepted():
    method = make_method()
    x, _ = first_batch(method.task, 4)
    with pytest.raises(UsageError, match="unknown solver 'rk4'; accepted: stochastic, euler, heun"):
        method.predict(x, solver="rk4")
    with pytest.raises(UsageError, match="steps=0 must be a whole number of at least 1"):
        method.predict(x, steps=0)


def test_prototype_needs_enough_images_per_class():
    images = torch.zeros(19, 1, 28, 28, dtype=torch.uint8)
    labels = torch.cat([torch.arange(10).repeat_interleave(2)[:-1]])  # class 9 has one image
    with pytest.raises(UsageError, match="at least 2 training images per class.*class 9 has 1"):
        make_method(make_task(images, labels), embedding="prototype")


def test_prototype_starts_at_class_medoids():
    task = make_task()
    method = make_method(task, embedding="prototype")
    images = task.normalize(task.train_images).flatten(1)
    for c in range(10):
        row = method.embedding.weight[c].detach()
        members = images[task.train_labels == c]
        assert (members - row).abs().sum(dim=1).min() == 0, "each class starts at one of its own images"
    assert method.embedding.dim == 784


def test_cli_rejects_unknown_solver(tmp_path):
    from noprop_bench.cli import run

    with pytest.raises(UsageError, match="solver='euler2' is not one of"):
        run(["--methods", "noprop_ct[solver=euler2]", "--out", str(tmp_path)])


# -- end to end ---------------------------------------------------------------------------------

def test_cli_end_to_end(tmp_path):
    from noprop_bench.cli import run

    out = tmp_path / "out"
    code = run(["--methods", "noprop_ct[steps=5,eval_steps=2,sweep_steps=[2,3]]", "--budget", "512samples",
                "--seeds", "1", "--checkpoints", "1", "--inference-runs", "1", "--inference-sweep", "--out", str(out)])
    assert code == 0
    record = json.loads((out / "trials.jsonl").read_text().splitlines()[-1])
    assert record["status"] == "ok" and record["method"] == "noprop_ct"
    assert 0 <= record["test_acc"] <= 100
    assert record["method_metrics"]["gamma1"] > record["method_metrics"]["gamma0"]
    assert [point["setting"] for point in record["inference_sweep"]] == [
        {"solver": solver, "steps": steps} for solver in ("euler", "heun") for steps in (2, 3)]
    assert 0 <= record["diagnostics"]["z_ablation"] <= 100
    assert "NoProp-CT (one-hot)" in (out / "table1.md").read_text()
    assert record["checkpoint_setting"] == {"solver": "heun", "steps": 2}  # the curve's points before the last
    assert "checkpoint setting of inference (NoProp-CT: heun 2)" in (out / "time_to_accuracy.md").read_text()


@pytest.mark.parametrize("setting", [{}, {"solver": "euler", "steps": 5}, {"solver": "heun", "steps": 10},
                                     {"ablate_z": True}])
def test_prediction_from_shared_features_is_algorithm_2_on_the_images(trained, setting):
    """Both ways into inference (the images, or their cached features) give the classifier's logits on z_1
    integrated as Algorithm 2 reads, step by step from the images' backbone features (or on fresh noise)."""
    method, x, _ = trained
    x = x[:200]
    with torch.inference_mode():
        torch.manual_seed(3)
        if setting.get("ablate_z"):
            z = torch.randn(len(x), method.embedding.weight.shape[1])
        else:
            solver = setting.get("solver", method.params["solver"])
            z = _integrate_step_by_step(method, method.model.features(x), solver,
                                        setting.get("steps", method.params["steps"]))
        reference = method.classifier(z)
    whole, shared = predictions_whole_and_shared(method, x, **setting)
    assert torch.equal(whole, reference) and torch.equal(shared, reference)


def _integrate_step_by_step(method, features, solver, steps):
    """The integration with every coefficient computed inside the loop, as Algorithm 2 reads."""
    W = method.embedding.weight
    grid = torch.linspace(0.0, 1.0, steps + 1)
    gamma, dgamma = method.schedule(grid)
    abar = torch.sigmoid(-gamma)
    times = method.model.time_features(grid)
    z = torch.randn(features.shape[0], W.shape[1])

    def u(z, k):
        return method.model.logits(features, z, times[k:k + 1]).softmax(dim=1) @ W

    def drift(z, k):
        return -0.5 * dgamma[k] * (abar[k].sqrt() * u(z, k) - abar[k] * z)

    h = 1.0 / steps
    for k in range(steps):
        if solver == "stochastic":
            ab_prev, ab_next = abar[k], abar[k + 1]
            alpha = ab_prev / ab_next
            a = ab_next.sqrt() * (1 - alpha) / (1 - ab_prev)
            b = alpha.sqrt() * (1 - ab_next) / (1 - ab_prev)
            c = (1 - ab_next) * (1 - alpha) / (1 - ab_prev)
            z = a * u(z, k) + b * z + c.clamp_min(0).sqrt() * torch.randn_like(z)
        elif solver == "euler":
            z = z + h * drift(z, k)
        else:
            f0 = drift(z, k)
            z = z + 0.5 * h * (f0 + drift(z + h * f0, k + 1))
    return z


@pytest.mark.parametrize("solver", ["stochastic", "euler", "heun"])
def test_coefficients_computed_before_the_loop_change_nothing(solver):
    method = make_method(make_task(backbone=small_backbone)).eval()
    x, _ = first_batch(method.task, 16)
    with torch.inference_mode():
        features = method.features(x)
        torch.manual_seed(2)
        reference = _integrate_step_by_step(method, features, solver, 25)
        torch.manual_seed(2)
        integrated = method.integrate(features, solver, 25)
    assert torch.equal(integrated, reference)


@pytest.mark.parametrize("embedding, solver, steps, train, test", [
    ("one-hot", "stochastic", 1000, 1, 1), ("learned", "heun", 20, 1, 1),
    ("prototype", "stochastic", 1000, 2, 1001), ("prototype", "heun", 20, 2, 41)])
def test_the_record_counts_the_label_paths_backbone_passes(embedding, solver, steps, train, test):
    """With the prototype embedding z is an image and the label path is a backbone, run at every evaluation
    of u: a test batch costs a backbone pass per step, which the record must say."""
    method = make_method(make_task(), embedding=embedding, solver=solver, steps=steps)
    metrics = method.trial_metrics()
    assert (metrics["backbone_passes_per_train_step"], metrics["backbone_passes_per_test_batch"]) == (train, test)


@pytest.mark.parametrize("gamma0", [-3.0, -16.0])
def test_stochastic_sampler_transports_the_marginals(monkeypatch, gamma0):
    """With a perfect u = u_y, Algorithm 2's sampler must end at q(z_1 | y) = N(sqrt(abar_1) u_y, (1 - abar_1) I),
    also when a learned gamma0 drifts far below 0, where 1 - alpha per step nears float32's resolution."""
    task = make_task()
    method = make_method(task, gamma0=gamma0, gamma1=5.0)
    x, y = first_batch(task, 8)
    y = y.repeat(512)
    monkeypatch.setattr(method.model, "logits", lambda f, z, t: 1e4 * F.one_hot(y, 10).float())
    with torch.inference_mode():
        abar_1 = float(method.schedule.abar(torch.tensor([1.0]))[0].double())
        torch.manual_seed(5)
        z_1 = method.integrate(torch.zeros(len(y), 256), "stochastic", 1000).double()
    u_y = method.embedding.weight[y].double()
    residual = z_1 - math.sqrt(abar_1) * u_y
    std = math.sqrt(1 - abar_1)
    on_label = (residual * u_y).sum(dim=1)  # the label's coordinate, where a wrong mean coefficient shows
    assert abs(float(on_label.mean())) < 0.05 * std  # its standard error: std / 64
    assert abs(float(residual.mean())) < 0.05 * std
    assert float(residual.std()) == pytest.approx(std, rel=0.05)


def test_a_step_list_is_written_in_brackets_and_stored_one_way():
    """Commas separate a method's parameters on the command line, so a list goes in brackets; however it is
    written, one list is one trial identity (the default written out is the default)."""
    from noprop_bench.specs import parse_method_spec

    name, given = parse_method_spec("noprop_ct[sweep_steps=[2, 5,10],steps=4]")
    assert NoPropCT.resolve_params(given)["sweep_steps"] == "2,5,10"
    written_out = NoPropCT.resolve_params(parse_method_spec("noprop_ct[sweep_steps=[2,5,10,20,40,100,1000]]")[1])
    assert written_out == NoPropCT.resolve_params({})
