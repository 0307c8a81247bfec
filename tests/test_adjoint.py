"""Adjoint baseline: adjoint vs direct gradients, backbone gradient, NFE counts, solver failure, bad input."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from noprop_bench import UsageError
from noprop_bench.run.budget import Budget
from noprop_bench.datasets import Normalizer
from noprop_bench.run.runner import RunData, TrialSpec, run_trial
from noprop_bench.task import Task
from noprop_bench.testing.host_sync import record_host_syncs
from noprop_bench_plugins.methods.adjoint import Adjoint, NFETrace
from noprop_bench_plugins.parts.ode import LatentDynamics, SolverError
from noprop_helpers import predictions_whole_and_shared

import fake_plugins

FEATURES = 16
# Fixed-step adjoint and direct gradients differ by the solver's error on the backward grid: with
# rk4 on 20 steps and a smooth field that is far below this relative tolerance.
GRAD_RTOL = 2e-3


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: OpenMP workers spinning on a busy machine would cost more than they give."""


def small_backbone():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, FEATURES), nn.Tanh())


def make_task():
    return Task(num_classes=4, image_shape=(1, 8, 8), device=torch.device("cpu"), backbone_name="tiny",
                make_backbone=small_backbone, backbone_features=FEATURES, normalize=Normalizer((0.5,), (0.25,), "cpu"))


def make_method(**params):
    torch.manual_seed(0)
    return Adjoint(make_task(), **Adjoint.resolve_params({key: str(value) for key, value in params.items()}))


def batch(n=8):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 8, 8, generator=generator), torch.arange(n) % 4


def gradients(adjoint, **params):
    method = make_method(z0="zeros", adjoint=adjoint, **params)
    x, y = batch()
    F.cross_entropy(method(x, adjoint=adjoint), y).backward()
    return {name: p.grad.clone() for name, p in method.named_parameters() if p.grad is not None}, method


def relative_error(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def test_adjoint_gradients_match_direct_backprop_through_the_same_solver():
    adjoint, _ = gradients(True, solver="rk4", steps=20)
    direct, _ = gradients(False, solver="rk4", steps=20)
    assert adjoint.keys() == direct.keys()
    errors = {name: relative_error(adjoint[name], direct[name]) for name in direct}
    assert max(errors.values()) < GRAD_RTOL, sorted(errors.items(), key=lambda kv: -kv[1])[:3]


def test_backbone_gets_its_gradient_through_the_adjoint():
    adjoint, method = gradients(True, solver="rk4", steps=20)
    direct, _ = gradients(False, solver="rk4", steps=20)
    backbone = [f"model.backbone.{name}" for name, _ in method.model.backbone.named_parameters()]
    assert backbone and all(name in adjoint for name in backbone)
    for name in backbone:
        assert adjoint[name].abs().sum() > 0, f"{name} got no gradient"
        assert relative_error(adjoint[name], direct[name]) < GRAD_RTOL, name
    # the image-path projection, also outside the ODE function, too
    assert relative_error(adjoint["model.fuse_image.weight"], direct["model.fuse_image.weight"]) < GRAD_RTOL


def test_function_evaluations_are_counted_forward_and_backward():
    x, y = batch()
    method = make_method(solver="rk4", steps=3)
    method.train_step(x, y)
    assert (method.dynamics.nfe_forward, method.dynamics.nfe_backward) == (12, 12)  # 4 stages x 3 steps
    direct = make_method(solver="euler", steps=7, adjoint="false")
    direct.train_step(x, y)
    assert (direct.dynamics.nfe_forward, direct.dynamics.nfe_backward) == (7, 0)  # autograd replays, no solve
    adaptive = make_method(solver="dopri5")
    for _ in range(3):
        adaptive.train_step(x, y)
    metrics = adaptive.trial_metrics()
    assert metrics["nfe_steps_counted"] == 3
    assert metrics["nfe_forward_last"] > 0 and metrics["nfe_backward_last"] > 0
    assert metrics["nfe_forward_mean"] >= 6  # dopri5: at least one step of 6 stages


def test_nfe_trace_stays_bounded_and_keeps_means():
    trace = NFETrace(window=2, capacity=4)
    for step in range(1, 41):
        trace.add(step, 2 * step)
    summary = trace.summary()
    assert len(summary["nfe_trace"]) < 4
    assert summary["nfe_forward_mean"] == pytest.approx(20.5)
    assert summary["nfe_trace"][-1]["step"] <= 40
    assert all(entry["nfe_backward"] == 2 * entry["nfe_forward"] for entry in summary["nfe_trace"])


class BlowUp(LatentDynamics):
    """``dz/dt = z^2 + 10`` from ``z = 0``: ``sqrt(10) tan(sqrt(10) t)``, infinite at t = 0.497."""

    def __call__(self, t, z):
        return super().__call__(t, z) * 0 + z.pow(2) + 10.0


class Stiff(Adjoint):
    name = "adjoint_blowup"

    def __init__(self, task, **params):
        super().__init__(task, **params)
        self.dynamics = BlowUp(self.model, self.params["time_scale"])


def run_one(method, params, budget="64samples"):
    data = RunData.load(fake_plugins.Tiny(), torch.device("cpu"))
    spec = TrialSpec(method=method, params=method.resolve_params(params), dataset="tiny", backbone="noprop_cnn",
                     budget=Budget.parse(budget), seed=0, batch_size=32, device=torch.device("cpu"),
                     augment="none", inference_runs=1, checkpoints=1)
    return run_trial(spec, data)


def test_an_underflowing_adaptive_solve_fails_the_trial_with_the_solver_message():
    record = run_one(Stiff, {"solver": "dopri5", "z0": "zeros"})
    assert record["status"] == "failed"
    assert record["error"].startswith("SolverError: dopri5 solver failed: underflow in dt"), record["error"]
    assert "peak_memory_bytes" in record and "method_metrics" in record


def test_a_solve_past_max_nfe_fails_instead_of_running_on():
    method = make_method(solver="dopri5", z0="zeros", max_nfe=30)
    method.dynamics = BlowUp(method.model, 1.0)
    with pytest.raises(SolverError, match="max_nfe=30"):
        method.train_step(*batch())


def test_a_trial_records_nfe_and_memory():
    record = run_one(Adjoint, {"steps": "2"}, budget="64samples")
    assert record["status"] == "ok", record.get("error")
    assert record["family"] == "continuous-time" and record["row_label"] == "Adjoint (one-hot)"
    assert record["param_defaults"]["steps"] == 5  # what the steps=2 of its row label differ from
    metrics = record["method_metrics"]
    assert metrics["nfe_forward_last"] == 8 and metrics["nfe_backward_last"] == 8
    assert metrics["gradients"] == "adjoint"
    assert record["peak_memory_bytes"] > 0


@pytest.mark.parametrize("params, message", [
    ({"solver": "rk45"}, "unknown solver 'rk45'; accepted: fixed-step euler"),
    ({"steps": "0"}, "steps=0 must be a whole number of at least 1"),
    ({"embedding": "learned"}, "one-hot only"),
    ({"embedding": "prototype"}, "one-hot only"),
    ({"z0": "ones"}, "z0='ones' is not one of noise, zeros"),
    ({"rtol": "0"}, "rtol=0.0 must be > 0"),
    ({"max_nfe": "0"}, "max_nfe=0"),
])
def test_bad_parameters_are_rejected_with_what_is_accepted(params, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace("[", r"\[")):
        Adjoint.resolve_params(params)


def test_predict_accepts_other_solver_settings_and_rejects_bad_ones():
    method = make_method(solver="rk4", steps=2)
    x, _ = batch()
    with torch.inference_mode():
        assert method.predict(x, solver="euler", steps=4).shape == (8, 4)
    with pytest.raises(UsageError, match="unknown solver"):
        method.predict(x, solver="nope")


def test_function_evaluations_are_recorded_on_every_curve_point(tmp_path):
    import json
    import torch
    from noprop_bench.cli import run
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = run(["--methods", "adjoint[solver=rk4,steps=2]", "--dataset", "mnist5k", "--budget", "384samples",
                    "--seeds", "1", "--checkpoints", "2", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    record = json.loads((tmp_path / "trials.jsonl").read_text())
    assert len(record["curve"]) >= 2  # checkpoints during training, then the final point
    for point in record["curve"]:
        assert point["nfe_forward"] == 8 and point["nfe_backward"] == 8  # rk4: 4 evaluations per step


@pytest.mark.parametrize("setting", [{}, {"solver": "euler", "steps": 3}, {"solver": "rk4", "steps": 2}])
@pytest.mark.parametrize("z0", ["zeros", "noise"])
def test_prediction_from_shared_features_is_the_classifier_on_the_solved_ode(setting, z0):
    """Both ways into inference (the images, or their cached features) give the classifier's logits on z(1),
    solved here by torchdiffeq's fixed-grid solver on an explicit grid of the steps asked for."""
    from torchdiffeq import odeint

    method = make_method(z0=z0).eval()
    x, _ = batch()
    solver, steps = setting.get("solver", method.params["solver"]), setting.get("steps", method.params["steps"])
    with torch.inference_mode():
        torch.manual_seed(3)
        start = torch.randn(len(x), 4) if z0 == "noise" else torch.zeros(len(x), 4)
        field = method.dynamics.bind(method.model.features(x))
        field.limit(0)
        reference = method.classifier(odeint(field, start, torch.linspace(0, 1, steps + 1), method=solver)[-1])
    whole, shared = predictions_whole_and_shared(method, x, **setting)
    # the method's grid is built from t's ends on the device: float rounding of the times only
    torch.testing.assert_close(whole, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shared, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("solver", ["rk4", "dopri5"])
def test_a_train_step_of_the_plugin_reads_nothing_back_from_the_device(solver):
    """The fixed-step grid is built from the ends of t on the device (torchdiffeq's own checks are not
    the plugin's doing, see ``noprop_bench.testing.host_sync``)."""
    method = make_method(solver=solver, steps=4)
    x, y = torch.randn(8, 1, 8, 8), torch.arange(8) % 4
    with record_host_syncs(torch.device("cpu"), ["noprop_bench_plugins"]) as syncs:
        method.train_step(x, y)
    assert syncs == []
