"""``noprop-bench speed``: a smoke test on random images of a dataset's shape, and its bad input."""

import json

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
    assert [r["ratio"] for r in rows if r["method"] == "backprop"] == [1.0, 1.0]
    assert rows[2]["checkpoint_setting"] == {"solver": "heun", "steps": 2}
    table = (out / "speed.md").read_text()
    assert "Tiny shape (1x16x16, 4 classes, random images)" in table and "eager bf16" in table
    printed = capsys.readouterr()
    assert table in printed.out
    # each row's figures are printed as soon as it is measured, so a run cut short keeps them
    first = rows[0]
    assert f"eager fp32: {first['ms_per_step']:.2f} ms/step" in printed.err
    assert printed.err.count(" ms/step (") == len(rows)


def test_large_rates_are_printed_in_plain_digits():
    from noprop_bench.run.speed import render

    row = {"row_label": "Backprop", "settings": "eager fp32", "ms_per_step": 0.2874, "samples_per_second": 445372.3,
           "ratio_to": "backprop", "ratio": 1.0, "inference_images_per_second_final": 3479550.2,
           "inference_images_per_second_checkpoint": 4196560.0, "peak_memory_bytes": 108e6, "compile_fallbacks": {}}
    table = render([row], "header")
    assert " 0.29 |" in table and " 103.0 |" in table
    assert "3479550" in table and "4196560" in table and "445372" in table and "e+" not in table


def test_profile_ranks_each_rows_costliest_operators_after_the_timed_steps(tmp_path, one_thread, capsys):
    out = tmp_path / "speed"
    code = run(["speed", "--plugin", "fake_plugins", "--dataset", "tiny", "--methods", "backprop",
                "--backbone", "noprop_cnn", "--batch-size", "8", "--steps", "2", "--profile", "4",
                "--out", str(out)])
    assert code == 0
    row = json.loads((out / "speed.json").read_text())["rows"][0]
    profile = row["profile"]
    assert profile["device_type"] == "cpu" and profile["steps"] == 2 and row["steps_timed"] == 2
    assert len(profile["top"]) == 4 and profile["busy_ms_per_step"] > 0
    own = [entry["ms_per_step"] for entry in profile["top"]]
    assert own == sorted(own, reverse=True) and sum(own) <= profile["busy_ms_per_step"] + 1e-9
    # a convolution network's step: its convolutions' backward is among the costliest operators
    assert any("convolution" in entry["operator"] for entry in profile["top"])
    assert all(0 < entry["share"] <= 1 and entry["calls_per_step"] > 0 for entry in profile["top"])
    table = (out / "speed.md").read_text()
    assert "## Profile: Backprop" in table and "own ms/step" in table and "% of busy" in table
    assert "operators busy" in capsys.readouterr().err


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


def test_speed_channels_last_flags_match_the_main_command(tmp_path):
    for flags, expected in ((["--channels-last"], [True]), (["--no-channels-last"], [False]),
                            (["--channels-last", "off,on"], [False, True]), ([], [False])):
        grid = settings_grid(build_parser().parse_args(flags), "cpu")
        assert [s.channels_last for s in grid] == expected


def test_speed_crosses_cudnn_autotuning_on_cuda_and_refuses_it_on_the_cpu():
    grid = settings_grid(build_parser().parse_args(["--cudnn-benchmark", "off,on", "--compile", "none,default"]),
                         "cuda")
    assert [(s.compile, s.cudnn_benchmark) for s in grid] == [("none", False), ("none", True),
                                                              ("default", False), ("default", True)]
    assert [s.cudnn_benchmark for s in settings_grid(build_parser().parse_args(["--cudnn-benchmark"]), "cuda")] == [True]
    assert [s.cudnn_benchmark for s in settings_grid(build_parser().parse_args([]), "cpu")] == [False]
    with pytest.raises(UsageError, match="--cudnn-benchmark: cuDNN runs on CUDA devices only"):
        settings_grid(build_parser().parse_args(["--cudnn-benchmark", "off,on"]), "cpu")


@pytest.mark.parametrize("flag, value", [("--precision", "fp8"), ("--compile", "fast"), ("--channels-last", "yes"),
                                         ("--cudnn-benchmark", "maybe"), ("--steps", "0"), ("--profile", "-1")])
def test_speed_rejects_bad_input(flag, value, tmp_path):
    with pytest.raises(UsageError):
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


def test_a_row_line_names_the_calls_replayed_as_cuda_graphs():
    row = {"ms_per_step": 2.0, "inference_images_per_second_final": 10.0,
           "inference_images_per_second_checkpoint": 20.0, "warmup_seconds": 1.0}
    assert "CUDA graphs" not in row_summary({**row, "captured": []})
    assert row_summary({**row, "captured": ["integrate", "update"]}).endswith("; CUDA graphs: integrate, update")
