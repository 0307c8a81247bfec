"""--preset paper: the paper's protocol in one flag, its 13 rows, overrides that the record and caption name."""

import json

import pytest

from noprop_bench.cli import build_parser
from noprop_bench.errors import UsageError
from noprop_bench.plugins import load_plugins
from noprop_bench.presets import PAPER_OPTIONS, apply_preset, explicit_options, method_override, preset_method_params
from noprop_bench.specs import parse_method_list


def preset_args(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    return args, apply_preset(args, explicit_options(parser, argv))


def test_without_methods_it_runs_the_13_rows_of_table_1():
    args, overrides = preset_args(["--preset", "paper"])
    assert overrides == []
    registry = load_plugins([])
    labels = []
    for name, given in parse_method_list(args.methods):
        cls = registry.method(name)
        labels.append(cls.row_label(cls.resolve_params(preset_method_params(name, given))))
    assert labels == ["Backprop (one-hot)", "Backprop (dim=20)", "Backprop (prototype)",
                      "NoProp-DT (one-hot)", "NoProp-DT (dim=20)", "NoProp-DT (prototype)", "Adjoint (one-hot)",
                      "NoProp-CT (one-hot)", "NoProp-CT (dim=20)", "NoProp-CT (prototype)",
                      "NoProp-FM (one-hot)", "NoProp-FM (dim=20)", "NoProp-FM (prototype)"]
    assert {key: getattr(args, key) for key in PAPER_OPTIONS} == PAPER_OPTIONS


def test_explicit_flags_override_and_are_named():
    args, overrides = preset_args(["--preset", "paper", "--budg", "20", "--seeds", "3", "--no-augment",
                                   "--methods", "noprop_ct", "--no-train-accuracy"])
    # --seeds 3 and no augmentation are the preset's own values
    assert overrides == ["--no-train-accuracy", "--budget 20"]
    assert (args.budget, args.methods, args.seeds, args.backbone) == ("20", "noprop_ct", 3, "noprop_cnn")


def test_method_settings_are_the_papers_and_departures_are_named():
    registry = load_plugins([])
    adjoint = registry.method("adjoint")
    params = adjoint.resolve_params(preset_method_params("adjoint", {}))
    assert (params["solver"], params["steps"], params["lr"], params["weight_decay"]) == ("euler", 1000, 1e-3, 1e-3)
    assert method_override(adjoint, params) == ""
    ct = registry.method("noprop_ct")
    assert method_override(ct, ct.resolve_params(preset_method_params("noprop_ct", {"embedding": "learned"}))) == ""
    assert method_override(ct, ct.resolve_params(preset_method_params("noprop_ct", {"lr": "0.01"}))) == \
        "noprop_ct[lr=0.01]"
    assert method_override(registry.method("backprop"), {}) == "backprop"  # never run by the paper


def test_a_preset_run_records_its_overrides_and_prints_an_estimate(fake_run, capsys):
    code, out = fake_run("--preset", "paper", "--methods", "linear", "--budget", "2steps", "--seeds", "1",
                         "--inference-runs", "1", "--checkpoints", "0")
    assert code == 0
    record = json.loads((out / "trials.jsonl").read_text().splitlines()[-1])
    assert record["preset"] == {"name": "paper",  # --seeds is how many trials run, not how one trains
                                "overrides": ["--inference-runs 1", "--budget 2steps", "linear"]}
    assert record["backbone"] == "noprop_cnn" and record["augment"] == "none" and record["train_acc_runs"]
    assert "speed probe" in capsys.readouterr().err
    assert "Run with --preset paper, overridden: --inference-runs 1, --budget 2steps, linear." in \
        (out / "table1.md").read_text()


def test_bf16_arithmetic_departs_from_the_papers_protocol_and_other_speed_settings_do_not(fake_run, tmp_path):
    """A bf16 run must not get a Δ against the paper as if it were the paper's protocol."""
    args = ("--preset", "paper", "--methods", "linear", "--budget", "2steps", "--seeds", "1", "--checkpoints", "0")
    fake_run(*args, "--precision", "bf16", out=tmp_path / "bf16")
    fake_run(*args, "--channels-last", out=tmp_path / "layout")
    records = {name: json.loads((tmp_path / name / "trials.jsonl").read_text().splitlines()[-1])
               for name in ("bf16", "layout")}
    overrides = {name: record["preset"]["overrides"] for name, record in records.items()}
    assert "--precision bf16" in overrides["bf16"]
    assert not any(item.startswith(("--precision", "--channels-last")) for item in overrides["layout"])


def test_preset_paper_on_data_the_paper_never_used_is_a_usage_error(fake_run):
    with pytest.raises(UsageError, match="--budget paper"):
        fake_run("--preset", "paper", "--methods", "linear")
