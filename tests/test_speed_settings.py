"""Harness-owned speed settings: warm-up leaves no trace, settings enter the trial id, compiled and
bf16/channels-last paths run and match eager fp32."""

import json

import pytest
import torch
from torch import nn

import fake_plugins
from noprop_bench.errors import UsageError
from noprop_bench.run.runner import TrialSpec
from noprop_bench.run.budget import Budget
from noprop_bench.run.speed_settings import (CompiledCall, SpeedSettings, apply_speed_settings, chosen_settings,
                                             backend_flags)
from noprop_bench.run import speed_settings
from noprop_bench.run.warmup import _restore_optimizer_in_place, warm_up
from noprop_bench_plugins.methods.adjoint import Adjoint
from noprop_bench_plugins.methods.backprop import Backprop
from noprop_bench_plugins.methods.noprop_ct import NoPropCT
from noprop_bench_plugins.methods.noprop_dt import NoPropDT
from noprop_bench_plugins.methods.noprop_fm import NoPropFM
from noprop_helpers import first_batch, mnist_shaped_task


def _records(out):
    return [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]


def _small_backbone():
    return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


BUILT_INS = [(Backprop, {}), (NoPropCT, {}), (NoPropDT, {"blocks": 3, "block_samples": 64}),
             (NoPropDT, {"blocks": 3, "schedule": "random"}), (NoPropDT, {"blocks": 3, "schedule": "parallel"}),
             (NoPropFM, {}),
             (Adjoint, {"solver": "euler", "steps": 2})]


def _optimizers(method):
    found = []
    for value in vars(method).values():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, torch.optim.Optimizer):
                found.append(item)
    return found


def _train(cls, params, warm: bool, steps: int = 3):
    torch.manual_seed(0)
    task = mnist_shaped_task(make_backbone=_small_backbone, features=4)
    method = cls(task, **params)
    x, y = first_batch(task, 16)
    if warm:
        warm_up(method, x, y, steps=2, inference=lambda: method.predict(x))
    torch.manual_seed(1)
    for _ in range(steps):
        method.train_step(x, y)
    return method, torch.rand(4)


@pytest.mark.parametrize("cls, params", BUILT_INS, ids=lambda v: getattr(v, "name", str(v)))
def test_warm_up_leaves_model_and_optimisers_exactly_as_they_were(cls, params, one_thread):
    (plain, plain_draw), (warmed, warmed_draw) = _train(cls, params, warm=False), _train(cls, params, warm=True)
    assert plain.state_dict().keys() == warmed.state_dict().keys()
    for (name, a), (_, b) in zip(plain.state_dict().items(), warmed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=name)  # bit for bit
    for first, second in zip(_optimizers(plain), _optimizers(warmed)):
        a, b = first.state_dict(), second.state_dict()
        assert a["param_groups"] == b["param_groups"]
        assert a["state"].keys() == b["state"].keys()
        for index in a["state"]:
            for key, value in a["state"][index].items():
                assert torch.equal(value, b["state"][index][key]), (index, key)
    assert torch.equal(plain_draw, warmed_draw)
    if cls is NoPropDT:  # block bookkeeping is Python state, restored too
        assert plain.block_steps == warmed.block_steps and plain.current == warmed.current


@pytest.fixture
def graphs(monkeypatch):
    """The graphs torch.compile compiles from here on, in the order it compiles them (nothing is optimised)."""
    compiled = []

    def counting(graph, example_inputs):
        compiled.append(graph)
        return graph.forward

    compile_ = torch.compile
    monkeypatch.setattr(speed_settings.torch, "compile", lambda fn, mode=None: compile_(fn, backend=counting))
    return compiled


@pytest.mark.parametrize("cls", [Backprop, NoPropDT, NoPropCT, NoPropFM, Adjoint])
@torch._dynamo.config.patch(recompile_limit=64)  # high: at the usual 8, code compiled again and again goes eager
def test_a_compiled_train_step_does_not_compile_again_on_the_clock_after_warm_up(cls, graphs, one_thread):
    """The warm-up restores the optimiser into its own tensors: replacing them would void the compiled
    step's guards, and the first timed step would compile again. Nor may a step's Python state that
    changes every step (the adjoint's evaluation counts) be traced into guards. The compiled steps compute
    what an eager twin computes: no Python state that changes between steps was traced in as a constant."""
    methods = []
    for _ in range(2):
        torch.manual_seed(0)
        task = mnist_shaped_task(make_backbone=_small_backbone, features=4)
        methods.append(cls(task))
    method, eager = methods
    apply_speed_settings(method, SpeedSettings(compile="default"), "cpu")
    x, y = first_batch(task, 16)
    warm_up(method, x, y, steps=3)
    assert graphs, "nothing was compiled in the warm-up"
    compiled = len(graphs)
    for step in range(5):  # more steps than the warm-up took (it restores Python state such as counters)
        losses = []
        for each in (method, eager):
            torch.manual_seed(step)
            losses.append(each.train_step(x, y)["loss"])
        # the graphs run unoptimised here (the counting backend), so only float rounding may differ
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6, msg=f"step {step + 1}")
    assert len(graphs) == compiled


@torch._dynamo.config.patch(recompile_limit=64)
def test_the_adjoint_compiles_the_same_graphs_whatever_its_number_of_solver_steps(graphs, one_thread):
    """The evaluation counts are Python ints that change within a solve: traced, each solver step would
    guard on its own values and compile the solver's step function again (past the recompile limit, it
    would run eagerly)."""
    task = mnist_shaped_task(make_backbone=_small_backbone, features=4)
    x, y = first_batch(task, 16)
    per_setting = []
    for steps in (2, 5):
        torch._dynamo.reset()
        method = Adjoint(task, **Adjoint.resolve_params({"steps": steps}))
        apply_speed_settings(method, SpeedSettings(compile="default"), "cpu")
        before = len(graphs)
        warm_up(method, x, y, steps=2)
        per_setting.append(len(graphs) - before)
    assert per_setting[0] > 0 and per_setting[0] == per_setting[1], per_setting


@torch._dynamo.config.patch(recompile_limit=2)
def test_every_compiled_trial_of_a_process_compiles_the_same_graphs(graphs, one_thread):
    """Code compiled for earlier trials must not use up torch's recompile limit (shared code such as
    Optimizer.step would then run eagerly in later trials)."""
    task = mnist_shaped_task(make_backbone=_small_backbone, features=4)
    x, y = first_batch(task, 16)
    per_trial = []
    for _ in range(4):
        method = Backprop(task)
        apply_speed_settings(method, SpeedSettings(compile="default"), "cpu")
        before = len(graphs)
        warm_up(method, x, y, steps=3)
        per_trial.append(len(graphs) - before)
    assert per_trial[0] > 0 and len(set(per_trial)) == 1, per_trial


def test_warm_up_restores_optimisers_without_zero_fresh_state_through_load_state_dict(one_thread):
    model = nn.Linear(3, 2)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=0.5)
    adam = torch.optim.Adam(model.parameters(), lr=0.1)
    fresh_sgd, fresh_adam = sgd.state_dict(), adam.state_dict()
    model(torch.ones(4, 3)).sum().backward()
    sgd.step()
    adam.step()
    # only optimisers whose fresh state is all zeros are restored in place (SGD's is not: with dampening,
    # a zero momentum buffer would not give its first step)
    assert not _restore_optimizer_in_place(sgd, fresh_sgd) and sgd.state[model.weight]
    moments = adam.state[model.weight]["exp_avg"]
    assert _restore_optimizer_in_place(adam, fresh_adam)
    assert adam.state[model.weight]["exp_avg"] is moments and not moments.any()


def test_warm_up_restores_the_global_random_generator(one_thread):
    task = mnist_shaped_task(make_backbone=_small_backbone, features=4)
    method = Backprop(task)
    x, y = first_batch(task, 8)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    warm_up(method, x, y, steps=2)
    assert torch.equal(torch.rand(3), expected)


def test_warm_up_restores_buffers_that_a_move_replaced():
    """``Module.to`` across devices (NoProp-DT's ``offload``) puts new buffer tensors in place; the warm-up
    must restore what the module holds at the end, not the tensors it held at the start."""
    from noprop_bench.run.warmup import MethodState

    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    x = torch.randn(8, 4)
    module.train()
    module(x)
    before = {name: tensor.clone() for name, tensor in module.state_dict().items()}
    state = MethodState(module)
    module._apply(lambda t: t.clone())  # what a move to another device and back does to the buffers
    module(x + 1)  # trains BatchNorm's running statistics off the clock
    with torch.no_grad():
        module[0].weight.add_(1.0)
    state.restore()
    after = module.state_dict()
    assert all(torch.equal(after[name], before[name]) for name in before)


def test_reference_settings_keep_old_trial_ids_and_others_change_them():
    spec = TrialSpec(method=fake_plugins.Linear, params={"lr": 0.05, "embedding": "one-hot"}, dataset="tiny",
                     backbone="noprop_cnn", budget=Budget.parse("3steps"), seed=0, batch_size=128,
                     device=torch.device("cpu"), augment="none")
    assert "speed" not in spec.config()
    old = spec.trial_id
    spec.speed_settings = SpeedSettings().as_dict()
    assert spec.trial_id == old
    ids = {old}
    for settings in (SpeedSettings(precision="bf16"), SpeedSettings(channels_last=True),
                     SpeedSettings(compile="default"), SpeedSettings(precision="tf32", compile="max-autotune")):
        spec.speed_settings = settings.as_dict()
        ids.add(spec.trial_id)
    assert len(ids) == 5


def test_cudnn_autotuning_enters_the_trial_id_only_when_on():
    spec = TrialSpec(method=fake_plugins.Linear, params={"lr": 0.05, "embedding": "one-hot"}, dataset="tiny",
                     backbone="noprop_cnn", budget=Budget.parse("3steps"), seed=0, batch_size=128,
                     device=torch.device("cpu"), augment="none")
    before = SpeedSettings(precision="bf16", channels_last=True)
    assert "cudnn_benchmark" not in before.identity()  # ids of trials from before the setting stay valid
    spec.speed_settings = {"precision": "bf16", "channels_last": True, "compile": "none"}
    old = spec.trial_id
    spec.speed_settings = before.identity()
    assert spec.trial_id == old
    tuned = SpeedSettings(precision="bf16", channels_last=True, cudnn_benchmark=True)
    spec.speed_settings = tuned.identity()
    assert spec.trial_id != old
    assert SpeedSettings(cudnn_benchmark=True).identity() == {"precision": "fp32", "channels_last": False,
                                                               "compile": "none", "cudnn_benchmark": True}
    assert tuned.describe() == "eager bf16, channels-last, cuDNN autotuning"
    assert SpeedSettings.from_dict(tuned.as_dict()) == tuned
    from noprop_bench.report.records import speed_text
    assert speed_text({"speed_settings": {**tuned.as_dict(), "compiled": []}}) == tuned.describe()  # captions


class SeesCudnnAutotuning(fake_plugins.Linear):
    """Notes whether cuDNN autotuning was on in each train step."""

    name = "sees_cudnn_autotuning"
    seen = []

    def train_step(self, x, y):
        self.seen.append(torch.backends.cudnn.benchmark)
        return super().train_step(x, y)


def test_a_trial_trains_under_its_cudnn_setting_and_gives_the_flag_back(one_thread):
    from noprop_bench.run.runner import RunData, run_trial

    data = RunData.load(fake_plugins.Tiny(), torch.device("cpu"))
    before = torch.backends.cudnn.benchmark
    for autotuning in (True, False):
        SeesCudnnAutotuning.seen = []
        # the command line refuses the flag off CUDA; a spec built directly still carries it to the trial
        spec = TrialSpec(method=SeesCudnnAutotuning, params=SeesCudnnAutotuning.resolve_params({}), dataset="tiny",
                         backbone="noprop_cnn", budget=Budget.parse("3steps"), seed=0, batch_size=8,
                         device=torch.device("cpu"), augment="none", checkpoints=0,
                         speed_settings=SpeedSettings(cudnn_benchmark=autotuning).identity())
        record = run_trial(spec, data)
        assert record["status"] == "ok" and record["speed_settings"]["cudnn_benchmark"] is autotuning
        assert SeesCudnnAutotuning.seen and set(SeesCudnnAutotuning.seen) == {autotuning}
        assert torch.backends.cudnn.benchmark == before


def test_cudnn_autotuning_is_refused_off_cuda():
    assert chosen_settings("cuda", cudnn_benchmark=True).cudnn_benchmark
    assert not chosen_settings("cuda").cudnn_benchmark
    with pytest.raises(UsageError, match="--cudnn-benchmark: cuDNN runs on CUDA devices only, not on cpu"):
        chosen_settings("cpu", cudnn_benchmark=True)


def test_tf32_is_refused_off_cuda():
    assert chosen_settings("cuda", precision="tf32").precision == "tf32"
    with pytest.raises(UsageError, match="--precision tf32: TF32 is for CUDA devices only; on cpu give fp32"):
        chosen_settings("cpu", precision="tf32")



def test_defaults_per_device_and_bad_values():
    assert chosen_settings("cpu").is_reference
    assert chosen_settings("cuda") == SpeedSettings(precision="tf32", channels_last=True)
    assert chosen_settings("cuda", precision="fp32", channels_last=False).is_reference
    with pytest.raises(UsageError, match="--precision"):
        SpeedSettings(precision="fp8")
    with pytest.raises(UsageError, match="--compile"):
        SpeedSettings(compile="fast")


def test_backend_flags_are_set_for_the_trial_and_restored():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with backend_flags(SpeedSettings(precision="tf32")):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    with backend_flags(SpeedSettings(precision="fp32")):
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert not torch.backends.cudnn.benchmark
    autotuning = torch.backends.cudnn.benchmark
    with backend_flags(SpeedSettings(cudnn_benchmark=True)):
        assert torch.backends.cudnn.benchmark
    assert torch.backends.cudnn.benchmark == autotuning
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_warm_up_is_outside_the_clock(fake_run):
    fake_plugins.SlowStart.started = False
    code, out = fake_run("--methods", "slow_start", "--budget", "0.5", "--checkpoints", "0")
    record = _records(out)[0]
    assert code == 0 and record["status"] == "ok"
    assert record["warmup_seconds"] >= 1.0  # the slow first step happened in the warm-up ...
    assert record["train_seconds"] < 0.9  # ... and was not charged to the 0.5 s budget
    assert record["compile_seconds"] == 0.0 and record["speed_settings"]["compile"] == "none"


def test_bf16_and_channels_last_run_and_are_recorded(fake_run):
    code, out = fake_run("--methods", "linear", "--budget", "3steps", "--precision", "bf16", "--channels-last")
    record = _records(out)[0]
    assert code == 0 and record["status"] == "ok"
    assert record["speed_settings"] == {"precision": "bf16", "channels_last": True, "compile": "none",
                                        "cudnn_benchmark": False, "compiled": [], "compile_fallbacks": {}, "captured": [],
                                        "capture_fallbacks": {}}
    assert "eager bf16, channels-last" in (out / "table1.md").read_text()


@pytest.mark.parametrize("cls, params", BUILT_INS, ids=lambda v: getattr(v, "name", str(v)))
def test_channels_last_trains_as_the_default_memory_format_does(cls, params, one_thread):
    """Channels-last (a CUDA default) changes only how convolutions lay out and sum their numbers: the
    losses of three steps and the first step's convolution-kernel gradients match those of a twin in the
    default format. (Parameters are not compared: a bias feeding batch norm has a true gradient of zero,
    and Adam turns the rounding noise standing in for it into full-size steps, which batch norm cancels.)"""
    def two_convolutions():
        return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten())

    twins = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        task = mnist_shaped_task(make_backbone=two_convolutions, features=4)
        twins.append(cls(task, **params))
        apply_speed_settings(twins[-1], SpeedSettings(channels_last=channels_last), "cpu")
    kernels = [p for p in twins[1].parameters() if p.dim() == 4]
    assert kernels and all(p.is_contiguous(memory_format=torch.channels_last) for p in kernels)
    x, y = first_batch(task, 16)
    for step in range(3):
        losses = []
        for twin in twins:
            torch.manual_seed(step)
            losses.append(twin.train_step(x, y)["loss"])
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6, msg=f"step {step + 1}")
        # the kernels channels-last lays out, relative to the gradient's norm (an element summed from large
        # terms of opposite signs differs more than the whole)
        for (name, a), (_, b) in zip(twins[0].named_parameters(), twins[1].named_parameters()):
            if step == 0 and a.grad is not None and a.dim() == 4:
                assert (a.grad - b.grad).norm() <= 1e-3 * a.grad.norm(), name  # seen: up to 7e-5


def test_compiled_fp32_matches_eager(fake_run, tmp_path):
    args = ("--methods", "linear", "--budget", "5steps", "--checkpoints", "1")
    _, eager_out = fake_run(*args, out=tmp_path / "eager")
    _, compiled_out = fake_run(*args, "--compile", "default", out=tmp_path / "compiled")
    eager, compiled = _records(eager_out)[0], _records(compiled_out)[0]
    assert compiled["status"] == "ok" and compiled["trial_id"] != eager["trial_id"]
    assert compiled["speed_settings"]["compiled"] == ["train_step", "predict"]
    assert compiled["speed_settings"]["compile_fallbacks"] == {}
    assert compiled["compile_seconds"] > 0
    assert compiled["steps"] == eager["steps"] == 5
    # tolerance: a compiled kernel may sum in another order; 5 SGD steps on a linear model stay within 1e-5
    for a, b in zip(eager["curve"], compiled["curve"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5, abs=1e-6)
        assert a["test_acc"] == b["test_acc"]
    # different speed settings never share a table
    assert "compile default" in (compiled_out / "table1.md").read_text()


def test_a_compile_failure_falls_back_to_eager_and_says_why(monkeypatch):
    class Refused(Exception):
        pass

    Refused.__module__ = "torch._dynamo.exc"

    def refuse(*args, **kwargs):
        raise Refused("cannot trace this")

    monkeypatch.setattr(torch, "compile", lambda function, mode=None: refuse)
    task = mnist_shaped_task(make_backbone=_small_backbone, features=4)
    method = Backprop(task)
    heard = []
    applied = apply_speed_settings(method, SpeedSettings(compile="default"), "cpu", heard.append)
    x, y = first_batch(task, 8)
    assert torch.isfinite(method.train_step(x, y)["loss"])  # ran eagerly
    record = applied.record()
    assert record["compiled"] == ["predict"]
    assert record["compile_fallbacks"] == {"train_step": "Refused: cannot trace this"}
    assert "train_step" in heard[0]


def test_a_method_error_inside_a_compiled_call_is_not_swallowed():
    def broken(x):
        raise ValueError("the method's own bug")

    call = CompiledCall("f", broken, "default", lambda name, reason: None)
    call.compiled = broken
    with pytest.raises(ValueError):
        call(torch.zeros(1))


@pytest.mark.parametrize("mode, copied", [("reduce-overhead", True), ("max-autotune", True), ("default", False)])
def test_outputs_of_modes_with_cuda_graphs_are_copied_out_before_the_next_call_overwrites_them(mode, copied):
    """Inductor's CUDA graphs (reduce-overhead, max-autotune) reuse their output memory on every replay: an
    evaluation holding the logits of earlier batches read overwritten values (seen on an H200)."""
    replayed = {"logits": torch.zeros(2, 3), "loss": torch.zeros(())}

    def replay(x):  # a stand-in for a replay: the same output tensors, rewritten
        replayed["logits"].copy_(x.expand(2, 3))
        replayed["loss"].fill_(x.sum())
        return {"logits": replayed["logits"], "loss": replayed["loss"]}

    call = CompiledCall("predict", replay, mode, lambda name, reason: None)
    call.compiled = replay
    first, second = call(torch.ones(1)), call(torch.full((1,), 2.0))
    assert (first["logits"].data_ptr() != second["logits"].data_ptr()) == copied
    if copied:
        assert torch.equal(first["logits"], torch.ones(2, 3)) and first["loss"] == 1
    assert torch.equal(second["logits"], torch.full((2, 3), 2.0)) and second["loss"] == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_channels_last_on_cuda(one_thread):
    task = mnist_shaped_task(make_backbone=_small_backbone, features=4)
    task.device = torch.device("cuda")
    method = Backprop(task).cuda()
    apply_speed_settings(method, SpeedSettings(precision="bf16", channels_last=True), "cuda")
    x, y = first_batch(task, 8)
    assert torch.isfinite(method.train_step(x.cuda(), y.cuda())["loss"])


def test_a_compiled_trial_compiles_nothing_once_its_clock_starts(fake_run, monkeypatch):
    """The warm-up compiles the inference path at two batch sizes, so the evaluation batches (other sizes
    again) reuse a graph dynamic in the batch dimension: no compilation is charged to the evaluations."""
    from torch._dynamo.utils import counters

    from noprop_bench.run import runner

    after_warmup = []

    def counting(*args, **kwargs):
        timing = original(*args, **kwargs)
        after_warmup.append(counters["stats"]["unique_graphs"])
        return timing

    original = runner.warm_up
    monkeypatch.setattr(runner, "warm_up", counting)
    before = counters["stats"]["unique_graphs"]
    code, out = fake_run("--methods", "linear", "--budget", "5steps", "--checkpoints", "2", "--train-accuracy",
                         "--compile", "default")
    record = _records(out)[0]
    assert code == 0 and record["status"] == "ok"
    assert record["speed_settings"]["compile_fallbacks"] == {}
    assert len(after_warmup) == 1 and after_warmup[0] > before  # the warm-up compiled ...
    assert counters["stats"]["unique_graphs"] == after_warmup[0]  # ... and nothing after it did
