"""Whole-call CUDA graphs (``capture_targets``): which calls are recorded, when a recording is reused, what
a failed capture does; on a GPU, that replays of NoProp-CT's and NoProp-FM's integration loop give the eager
results and follow parameter updates and the random generator.

On the CPU the recorder is a stand-in that replays by calling the function again into the recorded output,
so the bookkeeping of :class:`CapturedCall` is tested without a device."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import fake_plugins
from noprop_bench.conformance import ContractViolation
from noprop_bench.run.budget import Budget
from noprop_bench.run.runner import RunData, TrialSpec, run_trial
from noprop_bench.run import cuda_graphs, speed_settings
from noprop_bench.run.cuda_graphs import CapturedCall, CaptureFailed, Recording
from noprop_bench.report.tables import MEMORY_KINDS
from noprop_bench.run.memory import WITH_GRAPH_POOLS, with_graph_pools
from noprop_bench.run.speed_settings import AppliedSpeed, CompiledCall, SpeedSettings, apply_speed_settings
from noprop_bench.run.warmup import warm_up
from noprop_bench.testing.host_sync import record_host_syncs
from noprop_bench_plugins.methods.backprop import Backprop
from noprop_bench_plugins.methods.backprop_dt import BackpropDT
from noprop_bench_plugins.methods.noprop_ct import NoPropCT
from noprop_bench_plugins.methods.noprop_dt import NoPropDT
from noprop_bench_plugins.methods.noprop_fm import NoPropFM
from noprop_helpers import mnist_shaped_task

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _small_backbone():
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 32), nn.ReLU())


def _method(cls, device="cpu", **params):
    torch.manual_seed(0)
    task = mnist_shaped_task(make_backbone=_small_backbone, features=32, device=device)
    small = {key: value for key, value in {"time_dim": 8, "schedule_width": 8}.items() if key in cls.defaults}
    method = cls(task, **cls.resolve_params({**small, **params}))
    x, y = task.normalize(task.train_images[:32]), task.train_labels[:32]
    method.train_step(x, y)
    method.eval()
    return method, x, y


class StandIn:
    """Records by calling once, with the random generator put back afterwards as the CUDA recorder does;
    replays by calling again and writing into the recorded output.

    For an update (``after_warmup`` given) it runs the function twice first, as the CUDA recorder's warm-up
    and rehearsal do, then ``after_warmup``; its stand-in for the capture (which runs nothing on a device)
    is one more call undone by ``after_warmup``."""

    def __init__(self, fail_with=None):
        self.recordings, self.fail_with = 0, fail_with

    def __call__(self, function, args, kwargs, after_warmup=None):
        if self.fail_with is not None:
            raise self.fail_with
        self.recordings += 1
        static_args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
        if after_warmup is not None:
            function(*static_args, **kwargs)
            function(*static_args, **kwargs)
            after_warmup()
            output = function(*static_args, **kwargs)
            after_warmup()
        else:
            state = torch.get_rng_state()
            output = function(*static_args, **kwargs)
            torch.set_rng_state(state)
        return Recording(lambda: _copy_into(output, function(*static_args, **kwargs)), static_args, dict(kwargs),
                         output)


def _copy_into(output, values):
    if isinstance(output, dict):
        for key in output:
            output[key].copy_(values[key])
    else:
        output.copy_(values)


def _captured(method, record, **kwargs):
    fallbacks = []
    call = CapturedCall("integrate", method.integrate, method, lambda *reason: fallbacks.append(reason),
                        record=record, device_type="cpu", **kwargs)
    return call, fallbacks


def _ct_with_stand_in(**kwargs):
    """NoProp-CT's integration loop wrapped with a stand-in recorder: (method, x, record, call, fallbacks)."""
    method, x, _ = _method(NoPropCT)
    record = StandIn()
    call, fallbacks = _captured(method, record, **kwargs)
    return method, x, record, call, fallbacks


def test_a_recording_is_made_once_per_signature_and_replayed_into_fresh_tensors():
    method, x, record, call, fallbacks = _ct_with_stand_in()
    with torch.inference_mode():
        features = method.features(x)
        call(features, "heun", 5)  # records
        torch.manual_seed(1)
        eager = method.integrate(features, "heun", 5)
        torch.manual_seed(1)
        first = call(features, "heun", 5)
        second = call(features, "heun", 5)
        assert record.recordings == 1 and call.replays == 3
        torch.testing.assert_close(first, eager, rtol=0, atol=0)
        assert first is not second and first.data_ptr() != second.data_ptr()
        call(features[:16], "heun", 5)  # another shape
        call(features, "euler", 5)  # another setting
        call(features, "heun", 6)
        assert record.recordings == 4
        other = method.features(x.flip(0))
        torch.manual_seed(2)
        eager = method.integrate(other, "heun", 5)
        torch.manual_seed(2)
        torch.testing.assert_close(call(other, "heun", 5), eager, rtol=0, atol=0)
        assert record.recordings == 4  # new values of the same shape: replayed
    assert fallbacks == []


def test_a_replaced_parameter_makes_a_new_recording_and_stale_ones_are_dropped_beyond_the_limit():
    method, x, record, call, _ = _ct_with_stand_in(max_recordings=2)
    with torch.inference_mode():
        features = method.features(x)
        call(features, "heun", 3)
        weight = method.classifier.weight
        method.classifier.weight = nn.Parameter(weight.detach().clone())
        call(features, "heun", 3)
        assert record.recordings == 2
        call(features, "heun", 3)  # held
        assert record.recordings == 2
        # a third while one is stale (its classifier is gone): all are dropped together (graphs of one
        # stream share workspaces) and the new one is recorded
        call(features, "euler", 3)
        assert len(call.recordings) == 1 and record.recordings == 3
        call(features, "heun", 3)
        assert record.recordings == 4 and call.eager_calls == 0


def test_past_the_limit_a_cycle_of_settings_keeps_replaying_what_it_holds_and_runs_the_rest_eagerly():
    method, x, record, call, _ = _ct_with_stand_in(max_recordings=2)
    settings = [("heun", 3), ("euler", 3), ("heun", 4)]
    with torch.inference_mode():
        features = method.features(x)
        for _ in range(3):  # e.g. an inference sweep repeated over inference runs
            for solver, steps in settings:
                torch.manual_seed(7)
                eager = method.integrate(features, solver, steps)
                torch.manual_seed(7)
                torch.testing.assert_close(call(features, solver, steps), eager, rtol=0, atol=0)
    assert record.recordings == 2 and call.eager_calls == 3 and call.replays == 6


def test_calls_with_gradients_on_other_devices_or_odd_arguments_run_as_they_are():
    method, x, record, call, _ = _ct_with_stand_in()
    features = method.features(x).detach()
    call(features, "heun", 3)  # gradients enabled
    with torch.inference_mode():
        call(features, solver="heun", steps=3)
        assert record.recordings == 1  # keyword arguments are part of the signature too
        call(features, "heun", np.int64(3))  # not a plain Python value: no signature
        odd = CapturedCall("f", lambda a, b: a + 1, method, lambda *r: None, record=record, device_type="cuda")
        odd(features, 1)  # no tensor on the device it records for
        assert record.recordings == 1


def test_a_failed_capture_turns_the_call_eager_for_good_and_says_why():
    method, x, _ = _method(NoPropCT)
    call, fallbacks = _captured(method, StandIn(fail_with=CaptureFailed("RuntimeError: operation not permitted")))
    with torch.inference_mode():
        features = method.features(x)
        torch.manual_seed(1)
        eager = method.integrate(features, "heun", 3)
        torch.manual_seed(1)
        torch.testing.assert_close(call(features, "heun", 3), eager, rtol=0, atol=0)
        call(features, "euler", 3)
    assert fallbacks == [("integrate", "RuntimeError: operation not permitted")]
    assert call.record is None and not call.recordings


def test_the_functions_own_errors_and_running_out_of_memory_go_up_without_turning_it_eager():
    method, x, _ = _method(NoPropCT)
    for error in (ValueError("bad setting"), torch.cuda.OutOfMemoryError("out of memory")):
        call, fallbacks = _captured(method, StandIn(fail_with=error))
        with torch.inference_mode(), pytest.raises(type(error)):
            call(method.features(x), "heun", 3)
        assert fallbacks == [] and call.record is not None


def test_compile_on_cuda_captures_the_integration_loop_and_the_trial_records_it(monkeypatch):
    method, _, _ = _method(NoPropFM)
    applied = apply_speed_settings(method, SpeedSettings(compile="default"), "cuda")
    assert isinstance(method.integrate, CapturedCall) and not method.integrate.update
    assert isinstance(method.train_step, CapturedCall) and method.train_step.update
    assert isinstance(method.train_step.function, CompiledCall)  # compiled, and the compiled step captured
    record = applied.record()
    assert record["captured"] == ["integrate", "train_step"] and record["capture_fallbacks"] == {}
    applied.capture_fallback("integrate", "RuntimeError: no")
    assert applied.record()["captured"] == ["train_step"]
    assert applied.record()["capture_fallbacks"] == {"integrate": "RuntimeError: no"}

    on_cpu, _, _ = _method(NoPropCT)
    assert apply_speed_settings(on_cpu, SpeedSettings(compile="default"), "cpu").record()["captured"] == []
    assert not isinstance(on_cpu.integrate, CapturedCall)
    eager, _, _ = _method(NoPropCT)
    assert apply_speed_settings(eager, SpeedSettings(), "cuda").record()["captured"] == []
    backprop, _, _ = _method(Backprop)  # no inference loop: only its update
    assert apply_speed_settings(backprop, SpeedSettings(compile="default"), "cuda").record()["captured"] == [
        "train_step"]


def _backprop_pair():
    """Two equal Backprop methods (the small backbone) and four batches of the task."""
    pair = []
    for _ in range(2):
        torch.manual_seed(0)
        task = mnist_shaped_task(make_backbone=_small_backbone, features=32)
        pair.append(Backprop(task, **Backprop.resolve_params({})))
    images, labels = task.normalize(task.train_images), task.train_labels
    return pair, [(images[i:i + 10], labels[i:i + 10]) for i in range(0, 40, 10)]


def test_a_captured_update_undoes_its_recordings_runs_and_then_trains_as_the_eager_steps():
    (eager, captured), batches = _backprop_pair()
    record = StandIn()
    call = CapturedCall("train_step", captured.train_step, captured, lambda *reason: pytest.fail(str(reason)),
                        record=record, device_type="cpu", update=True)
    for x, y in batches:
        torch.manual_seed(3)
        expected = eager.train_step(x, y)
        torch.manual_seed(3)
        got = call(x, y)
        torch.testing.assert_close(got["loss"], expected["loss"], rtol=0, atol=0)
    assert record.recordings == 1 and call.replays == 4
    for (name, a), b in zip(eager.named_parameters(), captured.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    steps = [state["step"] for state in captured.optimizer.state.values()]
    assert steps and all(float(step) == 4 for step in steps)


def test_an_update_records_only_with_gradients_on_and_again_when_its_optimiser_state_is_replaced():
    (_, method), batches = _backprop_pair()
    record = StandIn()
    call = CapturedCall("train_step", method.train_step, method, lambda *reason: pytest.fail(str(reason)),
                        record=record, device_type="cpu", update=True)
    x, y = batches[0]
    call(x, y)
    call(x, y)  # the optimiser's state made by the first call is part of the signature it was kept under
    assert record.recordings == 1 and call.replays == 2
    with torch.no_grad():
        call.function = lambda x, y: {"loss": x.sum()}
        call(x, y)  # not an update: runs as it is
    call.function = method.train_step
    assert record.recordings == 1 and call.replays == 2
    method.optimizer.load_state_dict(copy.deepcopy(method.optimizer.state_dict()))  # new state tensors
    call(x, y)
    assert record.recordings == 2 and len(call.recordings) == 1
    method.optimizer.param_groups[0]["lr"] = 5e-4  # a rate a captured step would keep
    call(x, y)
    assert record.recordings == 3
    method.backbone[1].eval()  # another mode of one layer
    call(x, y)
    assert record.recordings == 4
    method.backbone[1].weight.requires_grad_(False)
    call(x, y)
    assert record.recordings == 5
    replays = call.replays
    call(x, y)
    assert record.recordings == 5 and call.replays == replays + 1


@pytest.mark.parametrize("schedule", ["random", "sequential"])
def test_noprop_dt_records_every_blocks_update_in_the_untimed_warm_up_and_is_put_back(schedule):
    method, x, y = _method(NoPropDT, blocks="4", schedule=schedule, block_samples="1000")
    record = StandIn()
    method.block_update = CapturedCall("block_update", method.block_update, method,
                                       lambda *reason: pytest.fail(str(reason)), record=record, device_type="cpu",
                                       update=True)
    before = [t.detach().clone() for t in list(method.parameters()) + list(method.buffers())]
    counts = (list(method.block_steps), method.current)
    warm_up(method, x, y, method_calls=True)
    assert record.recordings == 4  # the train steps reached one block or two; the hook reached the rest
    for a, b in zip(before, list(method.parameters()) + list(method.buffers())):
        # (the schedule's buffers hold NaN at index 0, which is unused)
        torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True)
    assert (list(method.block_steps), method.current) == counts


def test_an_update_whose_learning_rate_changes_every_step_turns_eager_after_twice_the_recordings_held():
    (eager, captured), batches = _backprop_pair()
    reasons = []
    call = CapturedCall("train_step", captured.train_step, captured, lambda *reason: reasons.append(reason),
                        record=StandIn(), device_type="cpu", update=True, max_recordings=2)
    x, y = batches[0]
    for step in range(8):
        for method in (eager, captured):
            method.optimizer.param_groups[0]["lr"] = 1e-3 / (step + 1)
        torch.testing.assert_close(call(x, y)["loss"], eager.train_step(x, y)["loss"], rtol=0, atol=0)
    assert call.recorded == 4 and call.record is None and len(reasons) == 1
    assert "change between steps" in reasons[0][1]


def test_noprop_dt_records_each_blocks_update_once_however_the_others_optimisers_grow():
    method, x, y = _method(NoPropDT, blocks="3", schedule="random")
    record = StandIn()
    method.block_update = CapturedCall("block_update", method.block_update, method,
                                       lambda *reason: pytest.fail(str(reason)), record=record, device_type="cpu",
                                       update=True)
    method.train()
    for _ in range(30):
        method.train_step(x, y)
    assert record.recordings == 3 and method.block_update.replays == 30 and method.block_update.eager_calls == 0


def test_an_update_whose_optimiser_state_would_be_made_inside_the_capture_runs_eagerly():
    """SGD's momentum, put back by ``load_state_dict``, would be made afresh by every replay: refused."""
    (eager, captured), batches = _backprop_pair()
    for method in (eager, captured):
        method.optimizer = torch.optim.SGD(method.parameters(), lr=0.1, momentum=0.9)
    reasons = []
    call = CapturedCall("train_step", captured.train_step, captured, lambda *reason: reasons.append(reason),
                        record=StandIn(), device_type="cpu", update=True)
    for x, y in batches:
        torch.testing.assert_close(call(x, y)["loss"], eager.train_step(x, y)["loss"], rtol=0, atol=0)
    assert reasons == [("train_step", "its optimiser's state cannot be kept in place across the recording's runs")]
    assert call.record is None and call.replays == 0
    for a, b in zip(eager.parameters(), captured.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_a_trials_peak_memory_adds_the_pools_of_its_update_graphs_and_says_so():
    assert with_graph_pools("cuda_max_allocated", 1000, 0) == (1000, "cuda_max_allocated")
    assert with_graph_pools("cuda_max_allocated", 1000, 300) == (1300, WITH_GRAPH_POOLS)
    assert with_graph_pools("cpu_peak_rss", 1000, 300) == (1000, "cpu_peak_rss")  # the process's resident set
    assert "memory reserved for the CUDA graphs of the recorded training updates" in MEMORY_KINDS[WITH_GRAPH_POOLS]

    method, x, y = _method(Backprop)
    applied = AppliedSpeed(SpeedSettings(compile="default"))
    applied.captured_calls = {
        path: CapturedCall(path, method.train_step, method, applied.capture_fallback, update=update,
                           device_type="cpu", record=lambda f, args, kwargs, after_warmup=None: Recording(
                               lambda: None, args, kwargs, {"loss": torch.zeros(())}, pool_bytes=1 << 20))
        for path, update in (("train_step", True), ("integrate", False))}
    method.train()
    applied.captured_calls["train_step"](x, y)
    with torch.inference_mode():
        applied.captured_calls["integrate"](x, y)
    assert applied.update_pool_bytes() == 1 << 20  # the inference loop's graph serves evaluations only
    assert applied.record()["capture_counts"]["integrate"]["pool_bytes"] == 1 << 20


REPLAYED_TRIALS = [
    (NoPropCT, {"steps": "4", "eval_steps": "2", "sweep_steps": "2,3"}, ["integrate", "update"]),
    (NoPropFM, {"steps": "4", "eval_steps": "2", "sweep_steps": "2,3"}, ["integrate", "train_step"]),
    (Backprop, {}, ["train_step"]),
    (BackpropDT, {"blocks": "3"}, ["train_step"]),
    (NoPropDT, {"blocks": "3", "schedule": "random"}, ["block_update"]),
    (NoPropDT, {"blocks": "3", "schedule": "sequential", "block_samples": "32"}, ["block_update"]),
    (NoPropDT, {"blocks": "3", "schedule": "parallel"}, ["parallel_update"]),
]


@pytest.mark.parametrize("method, params, captured", REPLAYED_TRIALS,
                         ids=lambda value: value.name if isinstance(value, type) else None)
def test_a_trial_whose_updates_and_integration_loop_are_replayed_gives_the_eager_trial_results(
        method, params, captured, monkeypatch):
    """The harness's path end to end (warm-up, training, checkpoints, final runs, sweep, diagnostics) with the
    capture targets wrapped as on CUDA, recorded by the stand-in: every loss and accuracy is the eager
    trial's, so the recordings' own updates were undone and every timed step was replayed."""
    data = RunData.load(fake_plugins.Tiny(), torch.device("cpu"))
    spec = TrialSpec(method=method, params=method.resolve_params(params),
                     dataset="tiny", backbone="noprop_cnn", budget=Budget.parse("96samples"), seed=0,
                     batch_size=32, device=torch.device("cpu"), augment="none", inference_runs=2, checkpoints=2,
                     train_accuracy=True, inference_sweep=True)
    eager = run_trial(spec, data)
    calls = []

    def captured_on_cpu(*args, **kwargs):
        calls.append(CapturedCall(*args, record=StandIn(), device_type="cpu", **kwargs))
        return calls[-1]

    monkeypatch.setattr(speed_settings, "captures_whole_calls", lambda settings, device_type: True)
    monkeypatch.setattr(speed_settings, "CapturedCall", captured_on_cpu)
    replayed = run_trial(spec, data)
    assert eager["status"] == replayed["status"] == "ok"
    assert replayed["speed_settings"]["captured"] == captured
    updates = [call for call in calls if call.update]
    assert len(updates) == 1 and updates[0].record.recordings >= 1
    # warm-up (3 steps, and NoProp-DT's update of each of its 3 blocks) and the trial's 3 steps all replayed;
    # the recordings' own runs were undone
    warm_up_calls = 3 if captured == ["block_update"] else 0
    assert updates[0].replays == 6 + warm_up_calls and updates[0].eager_calls == 0
    counts = replayed["speed_settings"]["capture_counts"][captured[-1]]  # the trial says so too
    assert counts == {"recordings": updates[0].recorded, "replays": 6 + warm_up_calls, "eager_calls": 0,
                      "pool_bytes": 0}
    assert replayed["steps"] == eager["steps"] == 3
    for key in ("test_acc_runs", "train_acc", "diagnostics", "inference_sweep", "curve", "method_metrics"):
        assert _without_times(replayed[key]) == _without_times(eager[key]), key


def _without_times(value):
    if isinstance(value, dict):
        return {k: _without_times(v) for k, v in value.items() if "second" not in k and k not in ("wall", "elapsed")}
    if isinstance(value, list):
        return [_without_times(v) for v in value]
    return value


@pytest.mark.parametrize("hook, kind", [("compile_targets", "compile target"), ("capture_targets", "capture target"),
                                        ("capture_step_targets", "capture step target")])
def test_a_target_that_is_not_callable_is_refused_with_its_name(hook, kind, monkeypatch):
    method, _, _ = _method(Backprop)
    monkeypatch.setattr(method, hook, lambda: ["params"])  # a dict, not a function
    # a contract violation (the method's trial fails, not the run); built methods are checked for it earlier
    with pytest.raises(ContractViolation, match=f"Backprop: {kind} 'params' is not a callable attribute of the method"):
        apply_speed_settings(method, SpeedSettings(compile="default"), "cuda")


def test_a_compiled_target_called_inside_a_capture_runs_eagerly_in_modes_with_their_own_cuda_graphs(monkeypatch):
    calls = []

    def eager(value):
        calls.append("eager")
        return value

    fallbacks = []
    for mode, expected in (("reduce-overhead", "eager"), ("max-autotune", "eager"), ("default", "compiled")):
        calls.clear()
        compiled = CompiledCall("f", eager, mode, lambda *reason: fallbacks.append(reason))
        compiled.compiled = lambda value: calls.append("compiled")
        monkeypatch.setattr(speed_settings, "recording_a_whole_call", lambda: True)
        monkeypatch.setattr(speed_settings.torch.cuda, "is_current_stream_capturing", lambda: True)
        compiled(1)
        assert calls == [expected], mode
        monkeypatch.setattr(speed_settings, "recording_a_whole_call", lambda: False)
        calls.clear()
        compiled(1)
        assert calls == ["compiled"], mode

    # a compiler error during a capture fails the capture; the target stays compiled for other calls
    compiled = CompiledCall("f", eager, "default", lambda *reason: fallbacks.append(reason))

    def recompiles_during_capture(value):
        raise torch._dynamo.exc.TorchRuntimeError("cannot JIT compile during CUDA graph capture")

    compiled.compiled = recompiles_during_capture
    monkeypatch.setattr(speed_settings, "recording_a_whole_call", lambda: True)
    monkeypatch.setattr(speed_settings.torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(torch._dynamo.exc.TorchRuntimeError):
        compiled(1)
    assert compiled.compiled is recompiles_during_capture and fallbacks == []

    # in the recording's warm-up, before the capture, a compiler error falls back to eager as anywhere else
    monkeypatch.setattr(speed_settings.torch.cuda, "is_current_stream_capturing", lambda: False)
    calls.clear()
    assert compiled(1) == 1 and calls == ["eager"] and compiled.compiled is None
    assert fallbacks == [("f", "TorchRuntimeError: cannot JIT compile during CUDA graph capture")]


def test_a_compiled_target_traced_into_another_joins_its_graph_whole():
    calls = []

    def inner(value):
        calls.append("inner ran eagerly")
        return value * 2

    inner_call = CompiledCall("inner", inner, "default", lambda *reason: pytest.fail(str(reason)))
    inner_call.compiled = lambda value: pytest.fail("the compiled inner target was called from a trace")
    outer = torch.compile(lambda value: inner_call(value) + 1, backend="eager", fullgraph=True)
    torch.testing.assert_close(outer(torch.ones(3)), torch.full((3,), 3.0))
    assert calls == ["inner ran eagerly"]


def test_a_capture_that_broke_half_way_turns_every_captured_call_eager(monkeypatch):
    monkeypatch.setattr(cuda_graphs, "_captures_off", None)
    monkeypatch.setattr(cuda_graphs, "_generator_usable_after_a_failed_capture", lambda: None)
    method, x, record, call, fallbacks = _ct_with_stand_in()
    with torch.inference_mode():
        features = method.features(x)
        call(features, "heun", 3)
        assert len(call.recordings) == 1

        # what ending a broken capture raises: the error that broke it is its context
        for cause, raised in ((ValueError("bad op in capture"), CaptureFailed),
                              (torch.cuda.OutOfMemoryError("out of memory"), torch.cuda.OutOfMemoryError)):
            monkeypatch.setattr(cuda_graphs, "_captures_off", None)
            try:
                try:
                    raise cause
                except Exception:
                    raise RuntimeError("operation not permitted when stream is capturing")
            except RuntimeError as ended:
                with pytest.raises(raised, match=str(cause)):
                    cuda_graphs._after_a_broken_capture(ended)
            assert cuda_graphs.captures_off_reason() == cuda_graphs.first_line(cause)

        torch.manual_seed(2)
        eager = method.integrate(features, "heun", 3)
        torch.manual_seed(2)
        torch.testing.assert_close(call(features, "heun", 3), eager, rtol=0, atol=0)
    assert call.record is None and not call.recordings and record.recordings == 1
    assert fallbacks == [("integrate", "captures are off in this process: OutOfMemoryError: out of memory")]


def test_running_out_of_memory_in_a_capture_that_ended_properly_leaves_captures_on(monkeypatch):
    monkeypatch.setattr(cuda_graphs, "_captures_off", None)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        cuda_graphs._after_a_broken_capture(torch.cuda.OutOfMemoryError("out of memory"))
    assert cuda_graphs.captures_off_reason() is None


@pytest.mark.parametrize("cls, solvers", [(NoPropCT, ("stochastic", "euler", "heun")), (NoPropFM, ("euler", "heun"))])
def test_the_captured_loops_read_nothing_back_from_the_device(cls, solvers):
    """What a capture forbids, seen on the CPU: no value read back, no tensor copied from host memory."""
    method, x, _ = _method(cls)
    with torch.inference_mode():
        features = method.features(x)
        with record_host_syncs(torch.device("cpu"), ["noprop_bench_plugins"]) as syncs:
            for solver in solvers:
                method.integrate(features, solver, 3)
    assert syncs == []


# -- on a GPU -------------------------------------------------------------------------------------

@cuda_only
@pytest.mark.parametrize("cls, solver", [(NoPropCT, "heun"), (NoPropCT, "euler"), (NoPropFM, "heun")])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_on_cuda_replays_of_an_ode_solve_match_eager_and_follow_training(cls, solver, precision):
    method, x, y = _method(cls, "cuda")
    call = CapturedCall("integrate", method.integrate, method, lambda name, reason: pytest.fail(reason))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16")
    with torch.inference_mode(), autocast:
        call(method.features(x), solver, 20)  # records
    for round_ in range(2):
        with torch.inference_mode(), autocast:
            features = method.features(x)
            torch.manual_seed(round_)
            eager = method.integrate(features, solver, 20)
            torch.manual_seed(round_)
            replayed = call(features, solver, 20)
        # fp32: the same kernels, so the same numbers; bf16: a matmul algorithm chosen apart from the
        # eager call's may round a bf16 product one step (2**-8) apart, while stale weights or noise would
        # be off by far more
        tolerance = dict(rtol=1e-5, atol=1e-5) if precision == "fp32" else dict(rtol=1.6e-2, atol=1e-3)
        torch.testing.assert_close(replayed, eager, **tolerance)
        method.train()
        method.train_step(x, y)  # parameters change in place: the next replay must see them
        with torch.no_grad():  # and by far more than a step's worth, so stale weights could not pass
            for parameter in method.parameters():
                parameter.mul_(1.5)
        method.eval()
    assert len(call.recordings) == 1 and call.replays == 3


CAPTURED_UPDATES = [(Backprop, {}), (BackpropDT, {"blocks": "3"}), (NoPropCT, {}), (NoPropFM, {}),
                    (NoPropDT, {"blocks": "3", "schedule": "random"}),
                    (NoPropDT, {"blocks": "3", "schedule": "parallel"})]


@cuda_only
@pytest.mark.parametrize("cls, params", CAPTURED_UPDATES,
                         ids=lambda value: value.name if isinstance(value, type) else None)
def test_on_cuda_replayed_updates_train_as_the_eager_steps(cls, params):
    """Each built-in's ``capture_step_targets`` recorded as CUDA graphs: the same losses and, after six steps on
    different batches, the same parameters as six eager steps from the same seeds."""
    eager, x, y = _method(cls, "cuda", **params)
    captured, _, _ = _method(cls, "cuda", **params)
    reasons = []
    paths = speed_settings._wrap_targets(captured, "capture_step_targets", "capture step target", lambda path, f: (
        CapturedCall(path, f, captured, lambda name, reason: reasons.append(reason), update=True)))
    calls = [getattr(captured, path) for path in paths]
    eager.train(), captured.train()
    for step in range(6):
        batch = torch.roll(x, step, dims=0), torch.roll(y, step, dims=0)
        torch.manual_seed(step)
        expected = eager.train_step(*batch)
        torch.manual_seed(step)
        got = captured.train_step(*batch)
        torch.testing.assert_close(got["loss"], expected["loss"], rtol=1e-5, atol=1e-6)
    assert reasons == [] and sum(call.replays for call in calls) == 6
    for (name, a), b in zip(eager.named_parameters(), captured.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    for (name, a), b in zip(eager.named_buffers(), captured.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


@cuda_only
def test_on_cuda_a_compiled_trial_replays_its_updates_and_counts_their_graphs_memory():
    data = RunData.load(fake_plugins.Tiny(), torch.device("cuda"))
    spec = TrialSpec(method=Backprop, params=Backprop.resolve_params({}), dataset="tiny", backbone="noprop_cnn",
                     budget=Budget.parse("640samples"), seed=0, batch_size=32, device=torch.device("cuda"),
                     augment="none", checkpoints=2, speed_settings={"compile": "default"})
    record = run_trial(spec, data)
    assert record["status"] == "ok", record.get("error")
    speed = record["speed_settings"]
    assert speed["captured"] == ["train_step"] and speed["capture_fallbacks"] == {}
    counts = speed["capture_counts"]["train_step"]
    assert counts["recordings"] == 1 and counts["eager_calls"] == 0
    assert counts["replays"] == record["steps"] + 3  # the warm-up's steps replayed too
    assert counts["pool_bytes"] > 0 and record["memory_kind"] == WITH_GRAPH_POOLS
    assert record["peak_memory_bytes"] > counts["pool_bytes"]


@cuda_only
def test_on_cuda_an_optimiser_counting_steps_on_the_host_is_made_capturable_and_trains_as_eagerly():
    """A foreach AdamW that already stepped keeps its step counts on the host: they move to the device."""
    models = []
    for _ in range(2):
        method, x, y = _method(Backprop, "cuda")
        method.optimizer = torch.optim.AdamW(method.parameters(), lr=1e-3, foreach=True)
        method.train()
        method.train_step(x, y)
        models.append(method)
    eager, captured = models
    assert all(not state["step"].is_cuda for state in captured.optimizer.state.values())
    call = CapturedCall("train_step", captured.train_step, captured, lambda name, reason: pytest.fail(reason),
                        update=True)
    for step in range(4):
        batch = torch.roll(x, step, dims=0), torch.roll(y, step, dims=0)
        torch.testing.assert_close(call(*batch)["loss"], eager.train_step(*batch)["loss"], rtol=1e-5, atol=1e-6)
    assert call.replays == 4 and all(state["step"].is_cuda for state in captured.optimizer.state.values())
    for a, b in zip(eager.parameters(), captured.parameters()):  # capturable's device arithmetic: rounding apart
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


@cuda_only
@pytest.mark.parametrize("autocast", [False, True])
def test_on_cuda_a_recording_turns_autocasts_weight_cache_off_only_under_autocast(autocast):
    seen = []

    def doubled(value):
        seen.append(torch.is_autocast_cache_enabled())
        return value * 2

    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        cuda_graphs.CudaGraphRecorder()(doubled, (torch.ones(4, device="cuda"),), {})
    assert seen == [not autocast] * 3  # warm-up, rehearsal and capture
    assert torch.is_autocast_cache_enabled()


@cuda_only
def test_on_cuda_a_replayed_update_under_bf16_autocast_keeps_training():
    method, x, y = _method(NoPropCT, "cuda")
    method.train()
    apply_speed_settings(method, SpeedSettings(precision="bf16", compile="default"), "cuda")
    assert isinstance(method.update, CapturedCall)
    before = [p.detach().clone() for p in method.parameters()]
    losses = [method.train_step(x, y)["loss"] for _ in range(4)]
    assert method.update.replays == 4 and method.update.record is not None
    assert all(torch.isfinite(loss) for loss in losses)
    assert any(not torch.equal(a, b) for a, b in zip(before, method.parameters()))


@cuda_only
@pytest.mark.parametrize("cls", [NoPropCT, NoPropFM])
def test_on_cuda_the_integration_loop_never_waits_for_the_host(cls):
    method, x, _ = _method(cls, "cuda")
    with torch.inference_mode():
        features = method.features(x)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for solver in ("stochastic", "heun") if cls is NoPropCT else ("euler", "heun"):
                method.integrate(features, solver, 5)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@cuda_only
def test_on_cuda_a_call_that_syncs_is_found_before_any_capture_and_runs_eagerly(monkeypatch):
    monkeypatch.setattr(cuda_graphs, "_captures_off", None)

    def syncs(features):
        noise = torch.randn_like(features)
        return features * float(noise.sum())  # reads a device value back: not capturable

    reasons = []
    owner = nn.Linear(2, 2).cuda()
    call = CapturedCall("syncs", syncs, owner, lambda name, reason: reasons.append(reason))
    with torch.inference_mode():
        torch.manual_seed(4)
        expected = syncs(torch.ones(4, device="cuda"))
        torch.manual_seed(4)
        out = call(torch.ones(4, device="cuda"))
    # the eager run after the failed rehearsal draws what an eager call from the same seed draws
    assert torch.equal(out, expected) and call.record is None and len(reasons) == 1
    assert reasons[0].startswith("it synchronises with the host")
    assert cuda_graphs.captures_off_reason() is None  # no capture began, so the process is unharmed
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    assert torch.cuda.get_sync_debug_mode() == 0
    torch.randn(3, device="cuda")  # the generator still draws outside a capture


@cuda_only
def test_on_cuda_a_capture_that_breaks_half_way_turns_captures_off_for_the_process(monkeypatch):
    monkeypatch.setattr(cuda_graphs, "_captures_off", None)

    def breaks_when_captured(features):
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("not capturable")
        return features * 2

    reasons = []
    owner = nn.Linear(2, 2).cuda()
    call = CapturedCall("breaks", breaks_when_captured, owner, lambda name, reason: reasons.append(reason))
    other = CapturedCall("twice", lambda features: features * 2, owner, lambda name, reason: reasons.append(reason))
    with torch.inference_mode():
        torch.testing.assert_close(call(torch.ones(4, device="cuda")), torch.full((4,), 2.0, device="cuda"))
        torch.testing.assert_close(other(torch.ones(4, device="cuda")), torch.full((4,), 2.0, device="cuda"))
    assert reasons == ["RuntimeError: not capturable",
                       "captures are off in this process: RuntimeError: not capturable"]
    assert call.record is None and other.record is None and not other.recordings
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    torch.randn(3, device="cuda")


@cuda_only
def test_on_cuda_the_stochastic_process_draws_fresh_noise_per_replay_and_follows_the_seed():
    method, x, _ = _method(NoPropCT, "cuda")
    call = CapturedCall("integrate", method.integrate, method, lambda name, reason: pytest.fail(reason))
    with torch.inference_mode():
        features = method.features(x)
        torch.manual_seed(7)
        eager = method.integrate(features, "stochastic", 50)
        torch.manual_seed(7)
        recorded = call(features, "stochastic", 50)  # the first call records, and draws what eager drew
        torch.testing.assert_close(recorded, eager, rtol=1e-5, atol=1e-5)
        torch.manual_seed(3)
        first = call(features, "stochastic", 50)
        second = call(features, "stochastic", 50)
        torch.manual_seed(3)
        again = call(features, "stochastic", 50)
    assert not torch.equal(first, second)
    torch.testing.assert_close(again, first, rtol=0, atol=0)


def test_with_new_recordings_paused_a_held_signature_replays_and_a_new_one_runs_eagerly():
    method, x, record, call, _ = _ct_with_stand_in()
    with torch.inference_mode():
        features = method.features(x)
        call(features, "heun", 3)
        with cuda_graphs.no_new_recordings():
            call(features, "heun", 3)
            torch.manual_seed(5)
            eager = method.integrate(features[:8], "euler", 3)
            torch.manual_seed(5)
            torch.testing.assert_close(call(features[:8], "euler", 3), eager, rtol=0, atol=0)
        assert record.recordings == 1 and call.replays == 2
        call(features[:8], "euler", 3)  # recorded once the pause is over
        assert record.recordings == 2


def test_the_warm_up_inference_records_no_cuda_graph():
    from noprop_bench.run.runner import _warm_up_inference

    method, x, record, call, _ = _ct_with_stand_in()
    method.integrate = call  # as apply_speed_settings wraps a capture target
    with torch.inference_mode():
        _warm_up_inference(method, x, compiled=True)()
    assert record.recordings == 0 and call.replays == 0
