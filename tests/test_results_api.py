"""The results API: load_trials, load_runs and load_curves on committed runs and hand-written fixtures."""

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import noprop_bench
from noprop_bench.report import frames
from noprop_bench.report.figures import curves_frame as figure_curves
from noprop_bench.report.records import load_records
from noprop_bench.report.tables import setting_label

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "report"
RESULTS = sorted(p.parent for p in (ROOT / "results").glob("*/trials.jsonl"))


@pytest.fixture(autouse=True)
def _relative_paths(monkeypatch):
    monkeypatch.chdir(ROOT)


def fixture_dirs(*names):
    return [str(Path("tests/fixtures/report") / name) for name in names]


def check_documented_dtypes(frame, columns):
    assert list(frame.columns[:len(columns)]) == list(columns)
    for name, (dtype, _) in columns.items():
        assert str(frame[name].dtype) == dtype, name


def test_the_package_exports_the_loaders():
    from noprop_bench import load_curves, load_runs, load_trials

    assert (load_trials, load_runs, load_curves) == (frames.load_trials, frames.load_runs, frames.load_curves)
    assert {"load_trials", "load_runs", "load_curves"} <= set(noprop_bench.__all__)
    with pytest.raises(AttributeError):
        noprop_bench.load_nothing  # noqa: B018
    assert {"load_trials", "load_runs", "load_curves", "Method"} <= set(dir(noprop_bench))  # tab completion


def test_directories_may_come_as_one_list_or_as_a_runs_trials_file_and_a_wrong_path_says_what_is_wrong(tmp_path):
    runs = ["results/mnist5k-noprop_ct-backprop-noprop_cnn-120s", "results/mnist5k-all-methods-noprop_cnn-60s"]
    expected = frames.load_trials(*runs)
    pd.testing.assert_frame_equal(frames.load_trials(runs), expected)
    pd.testing.assert_frame_equal(frames.load_trials(Path(p) for p in runs), expected)
    from_file = frames.load_trials(f"{runs[0]}/trials.jsonl", runs[1])
    assert list(from_file["trial_id"]) == list(expected["trial_id"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("")
    with pytest.raises(FileNotFoundError) as wrong:
        frames.load_runs(runs[0], "results/no-such-run", str(tmp_path / "empty"), str(tmp_path / "a-file"))
    assert ("results/no-such-run does not exist; no trials.jsonl in " in str(wrong.value)
            and "a-file is a file, not a run directory" in str(wrong.value))
    with pytest.raises(TypeError):
        frames.load_trials([])


def test_the_table_column_groups_trials_as_table_1_does():
    """Two runs of other budgets and backbones loaded together: one ``table`` value per Table 1 table, and
    Table 1's cells are the means of load_runs grouped by table, row and dataset."""
    from noprop_bench.report.table1 import table1_document

    runs = ["results/mnist5k-noprop_ct-backprop-noprop_cnn-120s", "results/mnist5k-noprop_ct-backprop-resnet18-120s",
            "results/mnist5k-all-methods-noprop_cnn-60s"]
    final = frames.load_runs(*runs).query("evaluation == 'final'")
    assert final["table"].nunique() == len(table1_document(load_records(runs)[0]).sections) == 3
    assert final.groupby("run_dir")["table"].nunique().eq(1).all()
    means = final.groupby(["table", "row", "dataset"])["test_acc"].mean()
    table = Path(runs[1], "table1.md").read_text()
    resnet18 = means[means.index.get_level_values(0).str.contains("backbone resnet18")]
    assert len(resnet18) == 2
    for (_, row, _), mean in resnet18.items():
        assert re.search(rf"\| {re.escape(row)} +\| +{mean:.2f} ±", table), row


def test_load_trials_one_row_per_trial_with_documented_dtypes():
    dirs = fixture_dirs("mnist", "cifar10")
    trials = frames.load_trials(*dirs)
    records, _ = load_records(dirs)
    assert len(trials) == len(records) == 13
    check_documented_dtypes(trials, frames.TRIAL_COLUMNS)
    assert trials["trial_id"].is_unique
    assert set(trials["status"]) == {"ok", "diverged"}  # the failed attempt was superseded by its rerun
    assert set(trials["run_dir"]) == set(dirs)
    # parameters flattened generically, one column per key
    assert set(trials["params.embedding"].dropna()) == {"one-hot", "learned", "prototype"}
    assert trials["environment.torch"].notna().all()
    record = next(r for r in records if r["status"] == "ok" and r.get("train_acc_runs"))
    row = trials.set_index("trial_id").loc[record["trial_id"]]
    assert row["test_acc_mean"] == pytest.approx(np.mean(record["test_acc_runs"]))
    assert row["train_acc_mean"] == pytest.approx(np.mean(record["train_acc_runs"]))
    assert row["seed"] == record["seed"] and row["device"] == record["environment"]["device_name"]
    assert pd.isna(trials.loc[trials["status"] == "diverged", "test_acc_mean"]).all()


def test_skipped_lines_are_warnings_and_duplicates_count_once():
    with pytest.warns(UserWarning) as caught:
        trials = frames.load_trials(*fixture_dirs("mnist", "truncated"))
    messages = [str(w.message) for w in caught]
    assert any("not valid JSON" in m for m in messages) and any("also in" in m for m in messages)
    assert trials["trial_id"].is_unique
    assert set(trials.loc[trials["trial_id"] == "m-bp-0", "run_dir"]) == {fixture_dirs("truncated")[0]}
    with pytest.raises(TypeError):
        frames.load_trials()
    with pytest.raises(FileNotFoundError, match="results/no-such-run"):
        frames.load_curves("tests/fixtures/report/mnist", "results/no-such-run")


@pytest.mark.parametrize("directory", RESULTS, ids=lambda p: p.name)
def test_committed_runs_load(directory):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trials, runs, curves = (load(directory) for load in (frames.load_trials, frames.load_runs,
                                                              frames.load_curves))
    records = [json.loads(line) for line in (directory / "trials.jsonl").read_text().splitlines() if line.strip()]
    assert len(trials) == len(records) and (trials["status"] == "ok").all()
    assert len(runs[runs["evaluation"] == "final"]) == sum(len(r["test_acc_runs"]) for r in records)
    assert len(curves) == sum(len(r["curve"]) for r in records)
    assert trials["started_at"].notna().all() and trials["peak_memory_bytes"].notna().all()


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.iterdir()))
def test_every_fixture_loads(name):
    dirs = fixture_dirs(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the truncated fixture warns on purpose
        records, _ = load_records(dirs)
        trials, runs, curves = frames.load_trials(*dirs), frames.load_runs(*dirs), frames.load_curves(*dirs)
    assert len(trials) == len(records) > 0
    ok = [r for r in records if r["status"] == "ok"]
    assert (runs["evaluation"] == "final").sum() == sum(len(r["test_acc_runs"]) for r in ok)
    assert len(curves) == sum(len(r.get("curve") or []) for r in records)


def test_load_runs_final_and_sweep_runs():
    dirs = fixture_dirs("mnist")
    runs = frames.load_runs(*dirs)
    records = [r for r in load_records(dirs)[0] if r["status"] == "ok"]
    check_documented_dtypes(runs, frames.RUN_COLUMNS)
    final = runs[runs["evaluation"] == "final"]
    assert len(final) == sum(len(r["test_acc_runs"]) for r in records)
    assert final["setting"].isna().all()
    sweep = runs[runs["evaluation"] == "sweep"]
    expected = [(setting_label(p["setting"]), v) for r in records for p in r.get("inference_sweep") or []
                for v in p["test_acc_runs"]]
    assert sorted(zip(sweep["setting"], sweep["test_acc"])) == sorted(expected)
    assert {"setting.solver", "setting.steps"} <= set(runs.columns)
    # the per-trial mean of its final runs is load_trials' test_acc_mean
    means = final.groupby("trial_id")["test_acc"].mean()
    trials = frames.load_trials(*dirs).set_index("trial_id")
    assert np.allclose(means, trials.loc[means.index, "test_acc_mean"])
    with_train = final[final["train_acc"].notna()]
    assert len(with_train) and (with_train["trial_id"].isin([r["trial_id"] for r in records
                                                            if r.get("train_acc_runs")])).all()


def test_load_curves_agrees_with_curves_csv():
    dirs = fixture_dirs("mnist", "cifar10")
    curves = frames.load_curves(*dirs)
    check_documented_dtypes(curves, frames.CURVE_COLUMNS)
    last = curves.groupby("trial_id")["point"].transform("max") == curves["point"]
    assert (curves["final"] == (last & (curves["status"] == "ok"))).all()
    assert curves["final"].sum() == (frames.load_trials(*dirs)["status"] == "ok").sum()
    published = figure_curves(load_records(dirs)[0])  # the figure's data: ok trials only
    ours = curves[curves["status"] == "ok"]
    key = ["dataset", "row_label", "seed", "point"]
    merged = published.merge(ours, left_on=key, right_on=["dataset", "row", "seed", "point"], suffixes=("", "_api"))
    assert len(merged) == len(published)
    assert np.allclose(merged["test_acc"], merged["test_acc_api"])
    assert np.allclose(merged["train_seconds"], merged["train_seconds_api"])


def test_unknown_and_missing_fields(tmp_path):
    """Records from newer versions (new nested settings, new fields) and older ones (fields missing) load."""
    base = json.loads((FIXTURES / "cifar10" / "trials.jsonl").read_text().splitlines()[0])
    newer = dict(base, trial_id="newer", speed={"compile": True, "precision": "bf16"}, code_version="1a2b3c",
                 params=dict(base["params"], steps=20), curve=[dict(p, nfe=12) for p in base["curve"]])
    older = {k: base[k] for k in ("status", "method", "row_label", "family", "dataset", "budget", "backbone",
                                  "seed", "test_acc_runs")}
    older.update(trial_id="older", params={"steps": "auto"})
    (tmp_path / "trials.jsonl").write_text("\n".join(json.dumps(r) for r in (newer, older)) + "\n")
    trials = frames.load_trials(tmp_path)
    check_documented_dtypes(trials, frames.TRIAL_COLUMNS)
    trials = trials.set_index("trial_id")
    assert trials.loc["newer", "speed.compile"] == True  # noqa: E712 (a pandas boolean)
    assert str(trials["speed.compile"].dtype) == "boolean" and pd.isna(trials.loc["older", "speed.compile"])
    assert trials.loc["newer", "code_version"] == "1a2b3c"
    assert str(trials["params.steps"].dtype) == "string"  # 20 and "auto": mixed kinds become text
    assert pd.isna(trials.loc["older", "peak_memory_bytes"]) and trials.loc["older", "device"] == "unknown device"
    curves = frames.load_curves(tmp_path)
    assert curves["nfe"].notna().sum() == len(base["curve"])
    pytest.importorskip("pyarrow")
    trials.to_parquet(tmp_path / "t.parquet")  # every column has one type


def test_describe_columns_documents_every_column():
    table = frames.describe_columns(frames.TRIAL_COLUMNS)
    assert list(table.columns) == ["column", "dtype", "meaning"] and len(table) == len(frames.TRIAL_COLUMNS)
    assert table["meaning"].str.len().min() > 5


def readme_results_example():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Working with results", 1)[1].split("\n## ", 1)[0]
    return "\n".join(re.findall(r"```python\n(.*?)```", section, flags=re.S))


def test_the_readme_example_runs(capsys):
    code = readme_results_example()
    assert "load_curves" in code
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip()
