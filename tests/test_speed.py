"""``noprop-bench speed``: a smoke test on random images of a dataset's shape, and its bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch

import fake_plugins

from noprop_bench.cli import run
from noprop_bench.errors import UsageError
from noprop_bench.run.speed import build_parser, row_summary, settings_grid


def test_speed_rows_for_every_method_and_setting(tmp_path, one_thread, capsys):
    out = tmp_path / "speed"
    code = run(["speed", "--plugin", "fake_plugins", "--dataset", "tiny", "--methods",
                "linear,backprop,noprop_ct[steps=4,eval_steps=2]", "--batch-size", "8", "--steps", "2",
                "--precision", "fp32,bf16", "--no-channels-last", "--out", str(out)])
    assert code == 0
    data = json.loads((out / "speed.json").read_text())
    rows = data["rows"]
    assert [(r["method"], r["precision"]) for r in rows] == [
        ("linear", "fp32"), ("backprop", "fp32"), ("noprop_ct", "fp32"),
        ("linear", "bf16"), ("backprop", "bf16"), ("noprop_ct", "bf16")]
    for row in rows:
        assert row["ms_per_step"] > 0 and row["samples_per_second"] == pytest.approx(8000 / row["ms_per_step"])
        assert row["inference_images_per_second_final"] > 0 and row["inference_images_per_second_checkpoint"] > 0
        assert row["ratio_to"] == "backprop" and row["steps_timed"] == 2
        fastest, slowest = row["ms_per_step_range"]
        assert fastest <= row["ms_per_step"] <= slowest
        assert row["others_cpu_share"] is None or 0 <= row["others_cpu_share"] <= 1
    assert data["interrupted"] is False and data["rows_planned"] == 6
    # how it was made, as a trial's record says it
    assert data["command"].startswith("noprop-bench speed --plugin fake_plugins --dataset tiny --methods ")
    assert "'linear,backprop,noprop_ct[steps=4,eval_steps=2]'" in data["command"]
    assert data["environment"]["torch"] == torch.__version__ and data["environment"]["threads"] == 1
    assert data["written_at"][:2] == "20" and data["noprop_bench"]
    assert [r["ratio"] for r in rows if r["method"] == "backprop"] == [1.0, 1.0]
    assert rows[2]["checkpoint_setting"] == {"solver": "heun", "steps": 2}
    table = (out / "speed.md").read_text()
    assert "Tiny shape (1x16x16, 4 classes, random images)" in table and "eager bf16" in table
    assert "\"vs backprop\": the row's samples/s over that method's with the same settings (above 1 is faster)" in table
    printed = capsys.readouterr()
    assert table in printed.out
    # each row's figures are printed as soon as it is measured, so a run cut short keeps them
    first = rows[0]
    assert f"eager fp32: {first['ms_per_step']:.2f} ms/step" in printed.err
    assert printed.err.count(" ms/step (") == len(rows)


def test_disturbed_steps_and_a_busy_machine_are_said_so():
    """The median hides a step that another process slowed; the row says its steps differed widely, and the
    caption says when the load average shows other processes competing for the CPU."""
    from noprop_bench.run.speed import busy_machine_text, render

    row = {"row_label": "Backprop", "settings": "eager fp32", "ms_per_step": 105.5, "samples_per_second": 1213.0,
           "ratio_to": "backprop", "ratio": 1.0, "inference_images_per_second_final": 900.0,
           "inference_images_per_second_checkpoint": 900.0, "peak_memory_bytes": 108e6, "compile_fallbacks": {},
           "ms_per_step_range": [98.0, 691.9]}
    assert "steps took 98.00-691.90 ms: disturbed, rerun on an idle machine" in render([row], "header")
    steady = {**row, "ms_per_step_range": [98.0, 110.0]}
    assert "disturbed" not in render([steady], "header")
    assert "load average reached 3.9 on the 2 cores this process may use" in busy_machine_text(3.9, 2, 2)
    assert busy_machine_text(2.2, 2, 2) == "" and busy_machine_text(None, 2, 2) == ""  # this run's own threads
    assert busy_machine_text(3.9, 2, 4) == ""  # four threads of its own on two cores load them about 4


def test_other_processes_busy_while_a_row_timed_its_steps_are_noted():
    """The load average lags; the CPU other processes used over the timed steps does not."""
    from noprop_bench.run.contention import CpuCounters, cpu_counters, others_cpu_share
    from noprop_bench.run.speed import busy_rows_text, render

    # 3 busy CPU seconds over 2 s on 2 cores, 1 of them this process's own: others kept half the machine
    assert others_cpu_share(CpuCounters(0.0, 10.0, 1.0), CpuCounters(2.0, 13.0, 2.0), cores=2) == 0.5
    assert others_cpu_share(None, CpuCounters(2.0, 13.0, 2.0)) is None
    assert others_cpu_share(CpuCounters(0.0, 10.0, 1.0), CpuCounters(0.01, 10.02, 1.0), cores=2) is None  # too short
    row = {"row_label": "Backprop", "settings": "eager fp32", "ms_per_step": 105.5, "samples_per_second": 1213.0,
           "ratio_to": "backprop", "ratio": 1.0, "inference_images_per_second_final": 900.0,
           "inference_images_per_second_checkpoint": 900.0, "peak_memory_bytes": 108e6, "compile_fallbacks": {},
           "ms_per_step_range": [98.0, 110.0], "others_cpu_share": 0.6}
    assert "other processes kept 60% of the machine's cores busy while its steps ran" in render([row], "header")
    assert "Other processes kept the CPU busy while 1 of the rows timed their steps" in busy_rows_text([row])
    quiet = {**row, "others_cpu_share": 0.02}
    assert "other processes" not in render([quiet], "header") and busy_rows_text([quiet]) == ""
    before = cpu_counters()
    if before is None:
        pytest.skip("no /proc/stat here")
    subprocess.run([sys.executable, "-c", "import time\nend = time.process_time() + 1.0\n"
                    "while time.process_time() < end: pass"], check=True)  # another process, one core busy
    assert others_cpu_share(before, cpu_counters()) > 0.5 / os.cpu_count()


def test_large_rates_are_printed_in_plain_digits():
    from noprop_bench.run.speed import render

    row = {"row_label": "Backprop", "settings": "eager fp32", "ms_per_step": 0.2874, "samples_per_second": 445372.3,
           "ratio_to": "backprop", "ratio": 1.0, "inference_images_per_second_final": 3479550.2,
           "inference_images_per_second_checkpoint": 4196560.0, "peak_memory_bytes": 108e6, "compile_fallbacks": {}}
    table = render([row], "header")
    assert " 0.29 |" in table and " 103.0 |" in table
    assert "3479550" in table and "4196560" in table and "445372" in table and "e+" not in table
    unmeasured = {**row, "ms_per_step": None, "samples_per_second": None, "ratio": None, "error": "RuntimeError: x",
                  "compile_fallbacks": {"update": "graph break"}}
    table = render([unmeasured], "header")
    assert "nan" not in table and " – |" in table
    assert "update ran eagerly: graph break; not measured: RuntimeError: x" in table
    split = {**row, "graph_breaks": {"Unsupported Tensor.item() call": 2}}
    assert "; 2 graph break(s)" in render([{**split, "compile_fallbacks": {"predict": "x"}}], "header")


def test_profile_ranks_each_rows_costliest_operators_after_the_timed_steps(tmp_path, one_thread, capsys):
    out = tmp_path / "speed"
    code = run(["speed", "--plugin", "fake_plugins", "--dataset", "tiny", "--methods", "backprop",
                "--backbone", "noprop_cnn", "--batch-size", "8", "--steps", "2", "--profile", "500",
                "--out", str(out)])
    assert code == 0
    row = json.loads((out / "speed.json").read_text())["rows"][0]
    profile = row["profile"]
    assert profile["device_type"] == "cpu" and profile["steps"] == 2 and row["steps_timed"] == 2
    top = profile["top"]
    own = [entry["ms_per_step"] for entry in top]
    assert own == sorted(own, reverse=True) and all(entry["share"] > 0 for entry in top)
    # every operator listed (500 is more than a step has): their own times make up the busy time
    assert sum(own) == pytest.approx(profile["busy_ms_per_step"]) and sum(e["share"] for e in top) == pytest.approx(1)
    # the paper's CNN has three convolutions, each differentiated once per step
    calls = {entry["operator"]: entry["calls_per_step"] for entry in top}
    assert calls["aten::convolution_backward"] == 3
    table = (out / "speed.md").read_text()
    assert "## Profile: Backprop" in table and "own ms/step" in table and "% of busy" in table
    assert "operators busy" in capsys.readouterr().err


def test_only_device_work_counts_on_cuda_and_each_kernel_once():
    from types import SimpleNamespace
    from torch.autograd import DeviceType
    from noprop_bench.run.profile import own_microseconds

    def event(device, own_device, own_cpu, annotation=False):
        return SimpleNamespace(device_type=device, self_device_time_total=own_device, self_cpu_time_total=own_cpu,
                               is_user_annotation=annotation, is_async=False)

    kernel = event(DeviceType.CUDA, 40.0, 0.0)
    operator = event(DeviceType.CPU, 40.0, 12.0)  # carries the device time of the kernel it launched
    region = event(DeviceType.CUDA, 95.0, 0.0, annotation=True)  # Optimizer.step, spanning its kernels
    assert [own_microseconds(e, "cuda") for e in (kernel, operator, region)] == [40.0, 0.0, 0.0]
    assert own_microseconds(operator, "cpu") == 12.0
    assert own_microseconds(SimpleNamespace(**{**vars(operator), "is_async": True}), "cpu") == 0.0


def test_a_profiler_failure_keeps_the_rows_timings(tmp_path, one_thread, monkeypatch):
    from noprop_bench.run import speed

    def broken(*args, **kwargs):
        raise RuntimeError("CUPTI_ERROR_NOT_INITIALIZED\nmore")

    monkeypatch.setattr(speed, "profile_steps", broken)
    out = tmp_path / "speed"
    code = run(["speed", "--plugin", "fake_plugins", "--dataset", "tiny", "--methods", "linear", "--batch-size", "8",
                "--steps", "2", "--profile", "5", "--out", str(out)])
    assert code == 0
    row = json.loads((out / "speed.json").read_text())["rows"][0]
    assert row["ms_per_step"] > 0 and "profile" not in row
    assert row["profile_error"] == "RuntimeError: CUPTI_ERROR_NOT_INITIALIZED"
    assert "Not profiled: the profiler failed: RuntimeError: CUPTI_ERROR_NOT_INITIALIZED" in (out / "speed.md").read_text()


def test_a_method_that_fails_is_a_row_saying_why_and_the_others_are_still_measured(tmp_path, one_thread,
                                                                                     monkeypatch):
    def broken_train_step(self, x, y):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore detail")

    monkeypatch.setattr(fake_plugins.Linear, "train_step", broken_train_step)
    out = tmp_path / "speed"
    code = run(["speed", "--plugin", "fake_plugins", "--dataset", "tiny", "--methods", "linear,backprop",
                "--batch-size", "8", "--steps", "2", "--out", str(out)])
    assert code == 1
    failed, measured = json.loads((out / "speed.json").read_text())["rows"]
    assert failed["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert failed["ms_per_step"] is None and failed["ratio"] is None
    assert measured["ms_per_step"] > 0 and measured["ratio"] == 1.0
    assert "not measured: RuntimeError: CUDA error" in (out / "speed.md").read_text()


def test_ctrl_c_keeps_the_rows_already_measured(tmp_path, one_thread, monkeypatch):
    from noprop_bench.run import speed

    measured = speed.measure
    calls = []

    def interrupted_on_the_second_row(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return measured(*args, **kwargs)

    monkeypatch.setattr(speed, "measure", interrupted_on_the_second_row)
    out = tmp_path / "speed"
    code = run(["speed", "--plugin", "fake_plugins", "--dataset", "tiny", "--methods", "linear,backprop",
                "--batch-size", "8", "--steps", "2", "--out", str(out)])
    assert code == 130
    rows = json.loads((out / "speed.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["ms_per_step"] > 0
    assert "Interrupted: 1 of the 2 planned rows was measured." in (out / "speed.md").read_text()
    data = json.loads((out / "speed.json").read_text())
    assert data["interrupted"] is True and data["rows_planned"] == 2  # a script reading it sees the cut


def test_ctrl_c_before_any_trial_exits_130_without_a_traceback(monkeypatch, capsys):
    from noprop_bench import cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "load_plugins_saying", interrupted)
    with pytest.raises(SystemExit) as stopped:
        cli.main(["--methods", "backprop"])
    assert stopped.value.code == 130
    assert capsys.readouterr().err == "noprop-bench: interrupted\n"


def test_a_method_that_breaks_the_step_contract_is_not_timed(tmp_path, one_thread, monkeypatch):
    """A trial fails a step that returns a Python float (a host sync each step): speed must not time it."""
    measured_step = fake_plugins.Linear.train_step

    def float_loss(self, x, y):
        return {"loss": measured_step(self, x, y)["loss"].item()}

    monkeypatch.setattr(fake_plugins.Linear, "train_step", float_loss)
    out = tmp_path / "speed"
    code = run(["speed", "--plugin", "fake_plugins", "--dataset", "tiny", "--methods", "linear", "--batch-size", "8",
                "--steps", "2", "--out", str(out)])
    assert code == 1
    row = json.loads((out / "speed.json").read_text())["rows"][0]
    assert row["ms_per_step"] is None and row["error"].startswith("ContractViolation")


def test_speed_takes_threads_as_the_main_command_does(tmp_path, one_thread):
    torch.set_num_threads(2)
    code = run(["speed", "--plugin", "fake_plugins", "--dataset", "tiny", "--methods", "linear", "--batch-size", "8",
                "--steps", "2", "--threads", "1", "--out", str(tmp_path)])
    assert code == 0 and torch.get_num_threads() == 1
    assert "1 threads" in (tmp_path / "speed.md").read_text()


def test_speed_channels_last_flags_match_the_main_command(tmp_path):
    for flags, expected in ((["--channels-last"], [True]), (["--no-channels-last"], [False]),
                            (["--channels-last", "off,on"], [False, True]), ([], [False])):
        grid = settings_grid(build_parser().parse_args(flags), "cpu")
        assert [s.channels_last for s in grid] == expected


def test_a_method_given_twice_is_one_row_as_in_the_main_command(tmp_path, one_thread, capsys):
    out = tmp_path / "speed"
    code = run(["speed", "--plugin", "fake_plugins", "--dataset", "tiny", "--methods", "linear,linear[lr=0.05],linear",
                "--batch-size", "8", "--steps", "2", "--out", str(out)])
    assert code == 0
    assert len(json.loads((out / "speed.json").read_text())["rows"]) == 1  # lr=0.05 is linear's default
    assert capsys.readouterr().err.count("more than once with the same parameters; it runs once") == 2


def test_a_setting_given_twice_is_one_row():
    grid = settings_grid(build_parser().parse_args(["--precision", "fp32,bf16,fp32", "--compile", "none,none"]), "cpu")
    assert [(s.precision, s.compile) for s in grid] == [("fp32", "none"), ("bf16", "none")]


def test_speed_takes_one_cudnn_autotuning_value_per_run_and_refuses_it_on_the_cpu():
    # cuDNN keeps the algorithms it chose for the whole process: "off" rows would hand theirs to "on" rows
    grid = settings_grid(build_parser().parse_args(["--cudnn-benchmark", "--compile", "none,default"]), "cuda")
    assert [(s.compile, s.cudnn_benchmark) for s in grid] == [("none", True), ("default", True)]
    assert [s.cudnn_benchmark for s in settings_grid(build_parser().parse_args(["--no-cudnn-benchmark"]), "cuda")] == [False]
    assert [s.cudnn_benchmark for s in settings_grid(build_parser().parse_args([]), "cuda")] == [False]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--cudnn-benchmark", "off,on"])
    with pytest.raises(UsageError, match="--cudnn-benchmark: cuDNN runs on CUDA devices only"):
        settings_grid(build_parser().parse_args(["--cudnn-benchmark"]), "cpu")
    with pytest.raises(UsageError, match="--precision tf32: TF32 is for CUDA devices only"):
        settings_grid(build_parser().parse_args(["--precision", "fp32,tf32"]), "cpu")


@pytest.mark.parametrize("flag, value", [("--precision", "fp8"), ("--compile", "fast"), ("--channels-last", "yes"),
                                         ("--precision", ""), ("--compile", ","), ("--steps", "0"),
                                         ("--batch-size", "0"), ("--profile", "-1"), ("--threads", "0")])
def test_speed_rejects_bad_input(flag, value, tmp_path):
    with pytest.raises(UsageError, match=f"^{flag} "):
        run(["speed", "--plugin", "fake_plugins", "--dataset", "tiny", "--methods", "linear", flag, value,
             "--out", str(tmp_path)])


def test_compiled_rows_warm_up_as_many_steps_as_a_compiled_trial(tmp_path, one_thread, monkeypatch):
    from noprop_bench.run import speed_settings
    from noprop_bench.run.warmup import WARMUP_STEPS

    calls = []
    compile_ = torch.compile

    def counting_compile(function, mode=None):
        compiled = compile_(function, backend="eager")

        def call(*args, **kwargs):
            calls.append(getattr(function, "__name__", "?"))
            return compiled(*args, **kwargs)
        return call

    monkeypatch.setattr(speed_settings.torch, "compile", counting_compile)
    out = tmp_path / "speed"
    assert run(["speed", "--plugin", "fake_plugins", "--dataset", "tiny", "--methods", "backprop", "--batch-size", "8",
                "--steps", "2", "--compile", "none,default", "--out", str(out)]) == 0
    eager, compiled = json.loads((out / "speed.json").read_text())["rows"]
    assert eager["warmup_steps"] == 1 and compiled["warmup_steps"] == WARMUP_STEPS > 1
    assert calls.count("train_step") == WARMUP_STEPS + 2
    assert f"({WARMUP_STEPS} for rows under --compile, as trials warm up)" in (out / "speed.md").read_text()


def test_the_warm_up_is_told_as_the_rows_had_it():
    from noprop_bench.run.speed import warmup_text
    from noprop_bench.run.warmup import WARMUP_STEPS
    from noprop_bench.run.speed_settings import SpeedSettings

    eager, compiled = SpeedSettings(), SpeedSettings(compile="default")
    assert warmup_text([eager], 1) == "1 untimed warm-up step(s)"
    assert warmup_text([compiled], 1) == f"{WARMUP_STEPS} untimed warm-up step(s), as compiled trials warm up"
    assert warmup_text([eager, compiled], 1) == (f"1 untimed warm-up step(s) ({WARMUP_STEPS} for rows under "
                                                 f"--compile, as trials warm up)")


def test_a_row_line_names_the_calls_replayed_as_cuda_graphs():
    row = {"ms_per_step": 2.0, "inference_images_per_second_final": 10.0,
           "inference_images_per_second_checkpoint": 20.0, "warmup_seconds": 1.0}
    assert "CUDA graphs" not in row_summary({**row, "captured": []})
    assert row_summary({**row, "captured": ["integrate", "update"]}).endswith("; CUDA graphs: integrate, update")


def test_a_row_line_gives_slow_step_rates_in_significant_figures_not_zero():
    row = {"ms_per_step": 2639.17, "inference_images_per_second_final": 205.0,
           "inference_images_per_second_checkpoint": 175.0, "warmup_seconds": 3.0}
    assert row_summary(row).startswith("2639.17 ms/step (0.379 steps/s)")
    assert row_summary({**row, "ms_per_step": 2.0}).startswith("2.00 ms/step (500 steps/s)")


def test_ratios_are_taken_against_plain_backprop_even_when_a_variant_comes_first():
    from noprop_bench.run.speed import add_ratios

    def row(method, label, params, samples_per_second, settings="eager fp32"):
        return {"method": method, "row_label": label, "params": params, "param_defaults": {"lr": 0.001},
                "settings": settings, "samples_per_second": samples_per_second}

    rows = [row("backprop", "Backprop [lr=0.01]", {"lr": 0.01}, 100.0), row("backprop", "Backprop", {"lr": 0.001}, 200.0),
            row("noprop_dt", "NoProp-DT", {"lr": 0.001}, 300.0), row("backprop", "Backprop", {"lr": 0.001}, 400.0, "bf16")]
    add_ratios(rows)
    assert [r["ratio"] for r in rows] == [0.5, 1.0, 1.5, 1.0]
    assert {r["ratio_to"] for r in rows} == {"backprop"}
    variants = [row("backprop", "Backprop [lr=0.01]", {"lr": 0.01}, 100.0), row("noprop_dt", "NoProp-DT", {"lr": 0.001}, 50.0)]
    add_ratios(variants)  # no plain backprop: the first backprop row, named by its label
    assert [r["ratio"] for r in variants] == [1.0, 0.5] and variants[1]["ratio_to"] == "Backprop [lr=0.01]"


def test_speed_keeps_an_image_folders_decoded_copy_under_data_root(tmp_path, one_thread):
    from test_imagefolder import write_tree

    write_tree(tmp_path / "tree", per_class=(4, 2), size=(16, 16))
    code = run(["speed", "--dataset", f"imagefolder:{tmp_path / 'tree'}", "--data-root", str(tmp_path / "root"),
                "--methods", "backprop", "--backbone", "noprop_cnn", "--batch-size", "4", "--steps", "1",
                "--out", str(tmp_path / "speed")])
    assert code == 0
    assert len(list((tmp_path / "root" / "decoded").glob("imagefolder-*.npz"))) == 1
    assert "tree shape (3x16x16, 2 classes, random images)" in (tmp_path / "speed" / "speed.md").read_text()
