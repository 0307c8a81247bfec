"""Reports from hand-written trials.jsonl fixtures, checked against golden files.

Regenerate the golden files after an intended change with ``NOPROP_UPDATE_GOLDEN=1 pytest tests/test_report.py``
and review the diff.
"""

import copy
import html
import os
from pathlib import Path

import numpy as np
import pytest

from noprop_bench.report.figures import curves_frame, seed_band, write_figure3
from noprop_bench.report.table1 import render_table1
from noprop_bench.report.cli import report_main, write_run_outputs
from noprop_bench.report.records import load_runs
from noprop_bench.report.tables import render_inference_sweep, render_table2
from noprop_bench.report.time_to_accuracy import first_time_reaching, parse_targets, render_time_to_accuracy
from noprop_bench.errors import UsageError

TESTS = Path(__file__).parent
GOLDEN = TESTS / "golden"
UPDATE = os.environ.get("NOPROP_UPDATE_GOLDEN") == "1"


@pytest.fixture(autouse=True)
def _relative_paths(monkeypatch):
    # notes name the files they skip; relative paths keep the golden files machine-independent
    monkeypatch.chdir(TESTS)


REWRITTEN = []


@pytest.fixture(autouse=True)
def _rewritten_golden_files_are_not_checks():
    # NOPROP_UPDATE_GOLDEN=1 writes the golden files, so comparing with them proves nothing: such a test skips
    yield
    if REWRITTEN:
        names = ", ".join(REWRITTEN)
        REWRITTEN.clear()
        pytest.skip(f"rewrote {names}: review the diff")


def check_golden(name: str, text: str):
    path = GOLDEN / name
    if UPDATE:
        path.write_text(text, encoding="utf-8")
        REWRITTEN.append(name)
        return
    assert text == path.read_text(encoding="utf-8"), f"{name} differs from its golden file"


def load(*names):
    return load_runs([f"fixtures/report/{name}" for name in names])


def test_table1_merges_datasets_in_paper_order():
    records, notes = load("mnist", "cifar10")
    text = render_table1(records, train_columns=True, notes=notes)
    check_golden("table1_merged.md", text)
    lines = text.splitlines()
    header = lines[2]
    assert header.index("MNIST5k train") < header.index("MNIST5k test") < header.index("CIFAR-10 test")
    order = [line.split("|")[1].strip() for line in lines[4:15] if line.startswith("|")]
    assert order == ["**Discrete-time**", "Backprop with linear head", "NoProp-DT (one-hot)", "**Continuous-time**",
                     "Adjoint (one-hot)", "NoProp-CT (one-hot)", "NoProp-CT (dim=20)", "NoProp-CT (prototype)",
                     "Zeta ODE (one-hot)"]
    assert "mean ± standard error" in text and "2 seed(s)" in text
    # NoProp-CT (one-hot): seeds 0 and 1 average 93.0 and 94.0 over 3 inference runs each; pooled s.e. of the
    # 6 values 0.25, s.e. of the 2 seed means 0.50; a single seed (dim=20) has no seed-level s.e.
    cells = _cells(text)
    assert cells["NoProp-CT (one-hot)"][:2] == ["–", "93.50 ± 0.25 [± 0.50]"]
    assert cells["NoProp-CT (dim=20)"][:2] == ["–", "91.00 ± 0.29 (1 of 2 seeds)"]
    # the prototype row's seed 1 diverged: its cell holds one of the table's two seeds and says so
    assert cells["NoProp-CT (prototype)"][:2] == ["–", "88.00 ± 0.29 (1 of 2 seeds)"]
    assert '"(k of n seeds)" marks a cell with fewer trained models' in text
    assert "pooled as the paper pools" in text and "[± s.e.] is the standard error over the per-seed means" in text
    assert "NoProp-CT (prototype) seed 1 on MNIST5k: diverged" in text
    assert "out of memory" not in text  # the failed attempt was superseded by its rerun


def test_table1_side_by_side_with_paper():
    records, notes = load("mnist", "cifar10")
    text = render_table1(records, paper=True, notes=notes)
    check_golden("table1_paper.md", text)
    assert "79.25 ± 0.28" in text  # NoProp-DT (one-hot), CIFAR-10 test
    assert "5k-image subset of MNIST" in text
    # the fixture's linear-head backprop was recorded as "Backprop (one-hot)": it is never paired with the paper
    legacy = next(line for line in text.splitlines() if line.startswith("| Backprop with linear head"))
    assert legacy.split("|")[3].strip() == "–" and "99.46" not in text


def _cells(text):
    return {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| ") and not line.startswith("| Method")}


def test_paper_rows_pair_by_method_not_by_label():
    records, _ = load("mnist")
    legacy = next(r for r in records if r["method"] == "backprop")
    paper_baseline = {**legacy, "method": "backprop_dt", "row_label": "Backprop (one-hot)", "method_label": "Backprop",
                      "trial_id": "dt" + legacy["trial_id"], "params": {"embedding": "one-hot", "dim": 20}}
    cells = _cells(render_table1(records + [paper_baseline], paper=True))
    assert cells["Backprop (one-hot)"][1] == "99.46 ± 0.06"
    assert cells["Backprop with linear head"][1] == "–"


def test_difference_to_the_paper_only_under_the_papers_protocol():
    records, _ = load("mnist")
    ct = [r for r in records if r["row_label"] == "NoProp-CT (one-hot)"]
    # a pilot seed run alone (its record made when --seeds still counted as an override), then two more seeds
    pilot = {**ct[0], "preset": {"name": "paper", "overrides": ["--seeds 1"]}}
    third = {**ct[1], "seed": 2, "trial_id": "third-seed", "preset": {"name": "paper", "overrides": []}}
    clean = [pilot, {**ct[1], "preset": {"name": "paper", "overrides": []}}, third]
    others = [r for r in records if r["row_label"] != "NoProp-CT (one-hot)"]
    text = render_table1(clean + others, paper=True)
    cells = _cells(text)
    ours = float(cells["NoProp-CT (one-hot)"][0].split()[0])
    assert cells["NoProp-CT (one-hot)"][1:] == ["97.84 ± 0.71", f"{ours - 97.84:+.2f}"]
    assert cells["NoProp-CT (dim=20)"] == ["91.00 ± 0.29 (1 of 3 seeds)", "97.70 ± 0.51", "–"]  # not a preset trial
    assert "shown only for rows run under --preset paper with nothing overridden" in text
    assert "and at least its 3 seeds" in text and "No Δ for rows run otherwise" in text
    assert "Run with --preset paper (3 of 9 trials), nothing overridden." in text  # --seeds is not an override

    two_seeds = render_table1(clean[1:], paper=True)  # the paper's protocol, but fewer than its 3 seeds
    assert "Δ" not in two_seeds.split("\n\n")[1].splitlines()[0]
    assert "shown only for rows" not in two_seeds and "or with fewer than the paper's 3 seeds" in two_seeds

    overridden = [{**r, "preset": {"name": "paper", "overrides": ["--budget 60"]}} for r in clean]
    text = render_table1(overridden, paper=True)
    assert "Δ" not in text.split("\n\n")[1].splitlines()[0]  # no difference column at all
    assert "Run with --preset paper, overridden: --budget 60." in text


def test_table2():
    records, _ = load("mnist", "cifar10")
    text = render_table2(records)
    check_golden("table2.md", text)
    assert "peak resident set size" in text and "CUDA" not in text.split("\n\n")[1]
    # s/epoch is the train-set size over the samples/s beside it (50,000 / 925), not a mean of per-seed ratios
    backprop = next(line for line in text.splitlines() if line.startswith("| Backprop with linear head"))
    assert [cell.strip() for cell in backprop.split("|")][6:8] == ["925", "54.05"]


def test_time_to_accuracy():
    records, _ = load("mnist", "cifar10")
    text = render_time_to_accuracy(records)
    check_golden("time_to_accuracy.md", text)
    assert "not reached" in text and "(1/2 seeds)" in text
    check_golden("time_to_accuracy_targets.md", render_time_to_accuracy(records, parse_targets("50,90")))


def test_time_to_accuracy_says_when_a_seed_that_reached_a_target_ended_below_it():
    from noprop_bench.report.time_to_accuracy import time_to_accuracy_frame

    records, _ = load("mnist")
    base = next(r for r in records if r.get("status") == "ok")
    trials = []
    for seed, (peak, final) in enumerate(((91.0, 88.0), (92.0, 93.0))):
        trial = copy.deepcopy(base)
        trial.update(seed=seed, trial_id=f"t{seed}", test_acc=final,
                     curve=[{"train_seconds": 10.0 * (seed + 1), "test_acc": peak},
                            {"train_seconds": 30.0, "test_acc": final}])
        trials.append(trial)
    frame = time_to_accuracy_frame(trials, (90.0, 92.5))
    assert list(frame.iloc[0][1:]) == ["15.0 s (1 ended below)", "30.0 s (1/2 seeds)"]


def test_inference_sweep():
    records, _ = load("mnist")
    text = render_inference_sweep(records)
    check_golden("inference_sweep.md", text)
    # as in Table 1: two seeds of 3 inference runs each, so the spread between training runs is shown too
    assert "90.50 ± 0.26 [± 0.50]" in text and "[± s.e.] is the standard error over the per-seed means" in text


def test_curves_csv():
    records, _ = load("mnist", "cifar10")
    check_golden("curves.csv", curves_frame(records).to_csv(index=False, float_format="%.6g"))


def test_curves_say_which_inference_setting_their_points_before_the_last_used():
    """NoProp-CT's checkpoints integrate with a cheap solver; its last point is Table 1's 1000-step process.
    Before, nothing said so: a curve looked like one setting throughout."""
    from noprop_bench.report.frames import curves_frame as curves_table

    records, _ = load("mnist")
    records = copy.deepcopy([r for r in records if r["status"] == "ok"])
    for record in records:
        record["checkpoint_setting"] = {"solver": "heun", "steps": 20} if record["method"] == "noprop_ct" else {}
    csv = curves_frame(records)
    ct = csv[csv.method == "noprop_ct"]
    assert set(ct[~ct.final].setting) == {"heun 20"} and set(ct[ct.final].setting) == {"final"}
    assert set(csv[(csv.method == "backprop") & ~csv.final].setting) == {"default"}
    frame = curves_table(records)
    assert list(frame[frame.method == "noprop_ct"].setting) == list(ct.setting)
    text = render_time_to_accuracy(records)
    assert ("at the method's checkpoint setting of inference (NoProp-CT: heun 20); the last point (end of "
            "budget) evaluates the whole test split, at the setting of Table 1.") in text
    for record in records:
        del record["checkpoint_setting"]  # records made before the setting was stored say nothing of it
    assert "checkpoint setting" not in render_time_to_accuracy(records)
    assert curves_frame(records).setting[~curves_frame(records).final].isna().all()


def test_figure_is_written(tmp_path):
    records, _ = load("mnist", "cifar10", "mixed")
    written = write_figure3(records, tmp_path / "figure3")
    assert [p.suffix for p in written] == [".png", ".svg"]
    assert all(p.stat().st_size > 1000 for p in written)
    assert (tmp_path / "figure3.png").read_bytes()[:4] == b"\x89PNG"


def test_a_figure_with_a_long_row_label_keeps_its_layout(tmp_path):
    """A path among a method's parameters makes a long label: the legend wraps it, the axes keep their size."""
    import warnings

    records, _ = load("mnist")
    long_label = "Backprop with linear head [marker=/a/very/long/path/" + "x" * 80 + "/died-once]"
    records = [{**r, "row_label": long_label} if r["method"] == "backprop" else r for r in records]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns when constrained layout collapses the axes
        write_figure3(records, tmp_path / "figure3")
    assert (tmp_path / "figure3.png").stat().st_size > 1000


def test_table_1_and_figure_3_say_at_which_setting_they_evaluated():
    """Table 1 of a default NoProp-CT run showed nothing of its 1000-step stochastic process, and Figure 3
    drew checkpoints at Heun 20 on a test subset as one line with the last point, without a word."""
    from noprop_bench.report.figures import figure3
    from noprop_bench.report.html import render_html

    records, _ = load("mnist")
    records = copy.deepcopy([r for r in records if r["dataset"] == "mnist5k"])
    for record in records:
        if record["method"] == "noprop_ct":
            record["params"].update(solver="stochastic", steps=1000)
            record["checkpoint_setting"] = {"solver": "heun", "steps": 20}
        record["checkpoint_size"] = 200
    assert "Inference (solver and steps): NoProp-CT: stochastic 1000." in render_table1(records)
    title = figure3(records)._suptitle.get_text().replace("\n", " ")
    assert ("points before the last: 200 test images; NoProp-CT: heun 20 (the last: Table 1's evaluation)"
            in title)
    page = html.unescape(render_html(records))
    caption = page[page.index("<figcaption"):page.index("</figcaption>")]
    assert "at the method's checkpoint setting of inference (NoProp-CT: heun 20)" in caption
    finals_only = [{**r, "curve": r["curve"][-1:]} for r in records]  # --checkpoints 0: no points before the last
    assert "points before the last" not in figure3(finals_only)._suptitle.get_text()
    assert "checkpoint setting" not in render_time_to_accuracy(finals_only)
    adaptive = [{**r, "params": {**r["params"], "solver": "dopri5", "steps": 5},
                 "method_metrics": {"solver": "dopri5", "steps": None, "rtol": 0.001, "atol": 0.0001}}
                for r in records if r["method"] == "noprop_ct"]
    assert "NoProp-CT: dopri5 rtol=0.001 atol=0.0001." in render_table1(adaptive)  # its steps are ignored


def test_a_one_panel_figures_title_fits_its_width():
    """The default run draws one panel, 4.5 in wide: its three title lines used to run off both edges."""
    from noprop_bench.report.figures import figure3

    records, _ = load("mnist")
    figure = figure3([r for r in records if r["dataset"] == "mnist5k"])
    figure.canvas.draw()
    extent = figure._suptitle.get_window_extent(figure.canvas.get_renderer())
    assert extent.x0 >= 0 and extent.x1 <= figure.bbox.width, (extent, figure.bbox.width)


def test_the_panel_titles_of_a_figure_of_several_tables_stay_within_their_panels():
    from noprop_bench.report.figures import figure3

    records, _ = load("mixed")
    for record in records:  # a long device name: a title line of its own
        record["environment"] = {**record["environment"], "device_name": "cpu (x86_64, a rather long processor "
                                 "model name as some machines report it, 64 logical cores, 64 threads)"}
    figure = figure3(records)
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    shown = [ax for ax in figure.axes if ax.get_visible()]
    assert len(shown) > 1
    for ax in shown:
        title, panel = ax.title.get_window_extent(renderer), ax.get_tightbbox(renderer)
        assert title.x0 >= panel.x0 - 1 and title.x1 <= figure.bbox.width, (ax.get_title(), title, figure.bbox.width)


def test_truncated_last_line_and_bad_record():
    records, notes = load("truncated")
    assert [r["trial_id"] for r in records] == ["m-bp-0", "m-bp-1"]
    assert any("trials.jsonl:4: not valid JSON" in n for n in notes)
    assert any("missing field(s)" in n for n in notes)
    check_golden("table1_truncated.md", render_table1(records, notes=notes))


def test_mixed_settings_never_share_a_cell():
    records, notes = load("mixed")
    text = render_table1(records, notes=notes)
    check_golden("table1_mixed.md", text)
    assert text.count("| Method") == 3  # 60s on the CPU, 20000samples on the CPU, 60s on the GPU
    assert "Backprop with linear head [lr=0.001]" in text and "Backprop with linear head [lr=0.0003]" in text
    table2 = render_table2(records)
    check_golden("table2_mixed.md", table2)
    assert "CUDA max allocated" in table2 and "peak resident set size" in table2
    assert table2.count("| Method") == 3
    with_paper = render_table2(records, paper=True).split("CUDA max allocated")[0]
    assert with_paper.count("paper (GB, one-hot)") == 1  # only next to CUDA numbers
    # the linear-head backprop is not the paper's Backprop: no paper memory beside it
    assert "0.87" not in with_paper and "| Backprop with linear head |                      0.900 |                             – |" in with_paper


def test_trials_trained_on_differently_set_up_data_never_share_a_cell():
    records, _ = load("mixed")
    base = [r for r in records if r["budget"] == "20000samples" and r.get("status") == "ok"]
    plain = render_table1(base)
    assert "augment=" not in plain and "val_split=" not in plain
    changed = []
    for record in base:
        for field, value in (("augment", "crop_flip"), ("val_split", 0.1)):
            trial = copy.deepcopy(record)
            trial.update({field: value, "seed": record["seed"] + 10, "trial_id": f"{record['trial_id']}-{field}"})
            changed.append(trial)
    text = render_table1(base + changed)
    assert text.count("| Method") == 1  # one table: only the cells split
    label = base[0]["row_label"]
    for row in (f"{label} [augment={base[0].get('augment')}, val_split=0.0]",
                f"{label} [augment=crop_flip, val_split=0.0]", f"{label} [augment={base[0].get('augment')}, val_split=0.1]"):
        assert f"| {row} " in text, row


def test_a_row_split_by_inference_runs_is_split_on_every_dataset_and_keeps_a_label_of_its_own_whole():
    from noprop_bench.report.records import assign_rows

    def trial(label, dataset, runs, seed, status="ok"):
        return {"status": status, "method": label.lower(), "row_label": label, "dataset": dataset,
                "inference_runs": runs, "seed": seed, "params": {}}

    rows = assign_rows([trial("NoProp-CT", "mnist5k", 2, 0), trial("NoProp-CT", "mnist5k", 5, 1),
                        trial("NoProp-CT", "cifar10", 5, 0), trial("ResNet[18]", "mnist5k", 1, 0),
                        trial("ResNet[18]", "mnist5k", 3, 1), trial("NoProp-CT", "mnist5k", None, 2, "failed")])
    assert rows == ["NoProp-CT [inference_runs=2]", "NoProp-CT [inference_runs=5]", "NoProp-CT [inference_runs=5]",
                    "ResNet[18] [inference_runs=1]", "ResNet[18] [inference_runs=3]", "NoProp-CT"]


def test_captions_say_when_training_data_were_augmented_or_partly_held_out():
    records, _ = load("mixed")
    base = [r for r in records if r["budget"] == "20000samples" and r.get("status") == "ok"]
    assert "Training data:" not in render_table1(base)
    changed = [{**copy.deepcopy(r), "augment": "crop_flip", "val_split": 0.25} for r in base]
    assert ("Training data: augmentation crop_flip; 25% of the training split held out for validation (not trained "
            "on).") in render_table1(changed)
    assert "Training data: augmentation crop_flip; 25% of the training split" in render_table2(changed)
    mixed = changed[:1] + [{**r, "seed": r["seed"] + 10, "trial_id": f"{r['trial_id']}-plain"} for r in base]
    assert "Training data: augmentation crop_flip or none (the rows name which); 0% or 25% of the training split " \
           "held out for validation (not trained on) (the rows name which)." in render_table1(mixed)
    # differing between datasets only (CIFAR-10 augments by default, MNIST does not): said per dataset
    other = [{**copy.deepcopy(r), "dataset": "cifar10", "dataset_label": "CIFAR-10", "augment": "crop_flip",
              "val_split": 0.004, "trial_id": f"{r['trial_id']}-cifar"} for r in base]
    assert ("Training data: MNIST5k: augmentation none, CIFAR-10: augmentation crop_flip; MNIST5k: 0% of the "
            "training split held out for validation (not trained on), CIFAR-10: 0.4% of the") in render_table1(base + other)


def test_a_trial_from_before_its_method_gained_a_parameter_is_not_labelled_with_a_value_it_never_had():
    records, _ = load("mixed")
    base = [r for r in records if r["budget"] == "20000samples" and r.get("status") == "ok"]
    newer = []
    for record in base:  # the same methods after a parameter was added, at its default
        trial = copy.deepcopy(record)
        trial["params"] = {**trial.get("params", {}), "activation": "relu"}
        trial["param_defaults"] = {**trial.get("param_defaults", trial["params"]), "activation": "relu"}
        trial.update({"seed": record["seed"] + 10, "trial_id": f"{record['trial_id']}-newer"})
        newer.append(trial)
    text = render_table1(base + newer)
    label = base[0]["row_label"]
    assert f"| {label} [activation=relu] " in text and f"| {label} " in text, text
    assert "activation=None" not in text


def test_a_sampling_method_with_other_inference_runs_gets_its_own_row_and_a_deterministic_one_does_not():
    """A cell is one statistic: a mean over 2 inference runs per seed pooled with one over 5 is neither."""
    records, _ = load("mixed")
    base = [r for r in records if r["budget"] == "20000samples" and r.get("status") == "ok"]
    sampling = [r for r in base if r["inference_runs"] > 1]
    deterministic = [r for r in base if r["inference_runs"] == 1]
    assert sampling and deterministic
    more_runs = []
    for record in base:  # another seed of each; a method that does not sample records 1 run whatever was asked
        trial = copy.deepcopy(record)
        runs = record["inference_runs"] + 3 if record in sampling else 1
        trial.update({"inference_runs": runs, "seed": record["seed"] + 10, "trial_id": f"{record['trial_id']}-runs"})
        more_runs.append(trial)
    text = render_table1(base + more_runs)
    label = sampling[0]["row_label"]
    runs = sampling[0]["inference_runs"]
    for row in (f"{label} [inference_runs={runs}]", f"{label} [inference_runs={runs + 3}]"):
        assert f"| {row} " in text, text
    # the caption's breakdown names the two rows, not the method twice
    assert f"{runs}: {label} [inference_runs={runs}]" in text and f"{runs + 3}: {label} [inference_runs={runs + 3}]" in text
    assert "inference_runs=" not in text.split(label)[0]  # the deterministic rows above it stay whole
    assert f"| {deterministic[0]['row_label']} " in text


A100, H100 = "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3"


def on_two_devices(budget, unit):
    """The mixed fixture's Backprop and NoProp-CT trials as seeds 0 and 1 on an A100 and seed 2 on an H100
    (4 + 2 trials), with ``budget``; ``unit`` None leaves budget_unit out, as older records do."""
    records, _ = load("mixed")
    base = [r for r in records if r["budget"] == "20000samples"]
    trials = []
    for seed, device in ((0, A100), (1, A100), (2, H100)):
        for record in base:
            trial = copy.deepcopy(record)
            trial.update(seed=seed, trial_id=f"{record['trial_id']}-{seed}", budget=budget, budget_unit=unit)
            if unit is None:
                del trial["budget_unit"]
            trial["environment"]["device_name"] = device
            trials.append(trial)
    return trials


@pytest.mark.parametrize("budget, unit, word", [("20000samples", "samples", "sample"),
                                                ("20000samples", None, "sample"), ("500steps", None, "step")])
def test_sample_budget_table1_spans_devices(budget, unit, word):
    text = render_table1(on_two_devices(budget, unit))
    assert text.count("| Method") == 1
    assert "3 seed(s)" in text
    assert (f"batch size 128. Devices: {A100} (4 trials), {H100} (2 trials): the group mixes device types; "
            f"accuracies share a {word} budget, but training times and throughput are not comparable across "
            f"devices.") in text
    assert "; device " not in text


def test_report_json_names_the_devices_of_a_table_that_a_sample_budget_did_not_split():
    """report.json's Table 1 said device null where the markdown caption named the device."""
    from noprop_bench.report.summary import summary

    spanning = summary(on_two_devices("20000samples", "samples"))["table1"]
    assert len(spanning) == 1 and spanning[0]["device"] is None
    assert spanning[0]["devices"] == {A100: 4, H100: 2}
    one = summary([r for r in on_two_devices("20000samples", "samples") if r["seed"] < 2])["table1"]
    assert one[0]["device"] == A100 and one[0]["devices"] == {A100: 4}


def test_seconds_budget_table1_splits_devices():
    text = render_table1(on_two_devices("60s", "seconds"))
    assert text.count("| Method") == 2
    assert "mixes" not in text and "Devices:" not in text
    assert text.count(f"; device {A100}.") == 1 and text.count(f"; device {H100}.") == 1
    assert "2 seed(s)" in text and "1 seed(s)" in text


def test_time_reports_split_devices_even_with_sample_budget():
    records = on_two_devices("20000samples", "samples")
    table2 = render_table2(records)
    assert table2.count("| Method") == 2
    assert "mixes" not in table2
    assert table2.count(f"; device {A100}.") == 1 and table2.count(f"; device {H100}.") == 1
    times = render_time_to_accuracy(records)
    assert times.count("## MNIST5k") == 2 and "mixes" not in times
    assert f"## MNIST5k (device {A100})" in times and f"## MNIST5k (device {H100})" in times
    curves = curves_frame(records)
    assert curves.groupby("table")["device"].nunique().tolist() == [1, 1]


def test_write_run_outputs(tmp_path):
    source = TESTS / "fixtures/report/mnist/trials.jsonl"
    (tmp_path / "trials.jsonl").write_bytes(source.read_bytes())
    table1 = write_run_outputs(tmp_path, targets="90")
    assert table1 == (tmp_path / "table1.md").read_text()
    assert "MNIST5k train" in table1  # shown wherever a run measured train accuracy
    for name in ("table2.md", "time_to_accuracy.md", "curves.csv", "figure3.png", "figure3.svg",
                 "inference_sweep.md"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert "≥ 90%" in (tmp_path / "time_to_accuracy.md").read_text()


def test_report_command(tmp_path, capsys):
    out = tmp_path / "out"
    code = report_main(["fixtures/report/mnist", "fixtures/report/cifar10", "fixtures/report/truncated",
                        str(tmp_path), "--out", str(out), "--paper", "--train-accuracy"])
    captured = capsys.readouterr()
    assert code == 0
    assert "CIFAR-10 test (paper)" in captured.out
    assert f"{tmp_path}: no trials.jsonl; skipped" in captured.err
    assert "not valid JSON" in captured.err
    # the truncated directory repeats mnist trials: counted once, never as extra seeds
    assert "also in fixtures/report/mnist" in captured.err
    assert (out / "figure3.png").exists() and (out / "table2.md").exists()


def test_report_command_without_anything_valid(tmp_path, capsys):
    assert report_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no trials.jsonl" in err[0]
    assert report_main(["fixtures/report/mnist", "--targets", "ninety"]) == 2


def test_helpers():
    assert first_time_reaching([{"train_seconds": 5, "test_acc": 91}, {"train_seconds": 2, "test_acc": 90}], 90) == 2
    assert first_time_reaching([], 50) is None
    times, mean, low, high = seed_band([[(0, 10), (10, 30)], [(0, 20), (5, 40)]])
    assert list(times) == [0, 5, 10] and list(mean) == [15, 30, 35] and list(high) == [20, 40, 40]
    # a seed whose first point comes later: the mean waits for it (no dip that no seed had), the band does not
    times, mean, low, high = seed_band([[(0.1, 40), (0.5, 42)], [(0.8, 18), (1.0, 30)]])
    assert list(times) == [0.1, 0.5, 0.8, 1.0] and np.isnan(mean[:2]).all() and list(mean[2:]) == [30, 36]
    assert list(low[:2]) == [40, 42] and list(high) == [40, 42, 42, 42]
    with pytest.raises(UsageError):
        parse_targets("120")


def test_a_byte_order_mark_an_editor_saved_does_not_cost_the_first_record(tmp_path):
    from noprop_bench.run.store import TrialStore

    good = (TESTS / "fixtures/report/mnist/trials.jsonl").read_bytes()
    (tmp_path / "trials.jsonl").write_bytes(b"\xef\xbb\xbf" + good)
    records, skipped = TrialStore(tmp_path).read()
    assert skipped == [] and records == TrialStore(TESTS / "fixtures/report/mnist").read()[0]


def test_report_skips_a_line_that_is_not_text_and_refuses_a_directory_of_records(tmp_path, capsys):
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    good = (TESTS / "fixtures/report/mnist/trials.jsonl").read_bytes()
    (damaged / "trials.jsonl").write_bytes(good + b"\xff\xfe not text\n")
    assert report_main([str(damaged), "--out", str(tmp_path / "out")]) == 0
    line = len(good.splitlines()) + 1
    assert f"trials.jsonl:{line}: not UTF-8 text (a damaged or foreign line); skipped" in capsys.readouterr().err
    odd = tmp_path / "odd"
    (odd / "trials.jsonl").mkdir(parents=True)
    assert report_main([str(odd)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trials.jsonl is a directory" in err[0]


def test_a_directory_that_does_not_exist_is_refused_not_left_out_of_a_merged_report(tmp_path, capsys):
    assert report_main(["fixtures/report/mnist", str(tmp_path / "typo"), "--out", str(tmp_path / "out")]) == 2
    assert f"{tmp_path / 'typo'}: no such directory" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_formats_given_by_repeating_the_flag_are_all_written(tmp_path):
    out = tmp_path / "out"
    assert report_main(["fixtures/report/mnist", "--out", str(out), "--format", "md", "--format", "json"]) == 0
    assert (out / "table1.md").exists() and (out / "report.json").exists()


def test_a_report_leaves_no_inference_sweep_of_trials_it_does_not_hold(tmp_path):
    out = tmp_path / "out"
    assert report_main(["fixtures/report/mnist", "--out", str(out)]) == 0
    assert (out / "inference_sweep.md").exists()
    assert report_main(["fixtures/report/cifar10", "--out", str(out)]) == 0
    assert not (out / "inference_sweep.md").exists()


def test_table1_lists_the_warnings_of_the_trials_it_holds():
    records, _ = load("mnist")
    records = copy.deepcopy(records)
    records[0]["method_metrics"] = {"warnings": ["blocks 2 of 10 got less than one pass"]}
    records[1]["warnings"] = ["2 of 8 checkpoints were evaluated"]
    text = render_table1(records)
    listed = text.split("Warnings of trials in the table:\n")[1].split("\n\n")[0].splitlines()
    assert listed == [f"- {records[0]['row_label']} seed {records[0]['seed']} on MNIST5k: blocks 2 of 10 got less than one pass",
                      f"- {records[1]['row_label']} seed {records[1]['seed']} on MNIST5k: 2 of 8 checkpoints were evaluated"]
    assert "Warnings of trials" not in render_table1(load("mnist")[0])
    # a plugin's warnings as one text, or a number, are one warning each, never a character per line
    records[0]["method_metrics"] = {"warnings": "blocks untrained"}
    records[1]["warnings"] = 3
    assert render_table1(records).split("Warnings of trials in the table:\n")[1].split("\n\n")[0].splitlines() == [
        f"- {records[0]['row_label']} seed {records[0]['seed']} on MNIST5k: blocks untrained",
        f"- {records[1]['row_label']} seed {records[1]['seed']} on MNIST5k: 3"]


def test_warnings_name_their_table_when_there_are_several_and_speed_fallbacks_are_warnings():
    """Merged runs make one table per speed setting with rows of the same names: a warning says which; a target
    that ran eagerly under --compile is listed too, and in Table 2, whose throughput it concerns."""
    eager = copy.deepcopy(load("mnist")[0][:1])
    compiled = copy.deepcopy(eager)
    eager[0]["warnings"] = ["2 of 8 checkpoints were evaluated"]
    compiled[0].update(trial_id="compiled", speed_settings={
        "precision": "fp32", "compile": "default", "channels_last": False, "cudnn_benchmark": False,
        "compile_fallbacks": {"train_step": "Unsupported: data-dependent branch"}})
    label, seed = eager[0]["row_label"], eager[0]["seed"]
    table1 = render_table1(eager + compiled)
    assert table1.split("Warnings of trials in the table:\n")[1].split("\n\n")[0].splitlines() == [
        f"- {label} seed {seed} on MNIST5k (speed settings eager fp32): 2 of 8 checkpoints were evaluated",
        f"- {label} seed {seed} on MNIST5k (speed settings fp32, compile default): train_step ran eagerly under "
        f"--compile default: Unsupported: data-dependent branch"]
    table2 = render_table2(eager + compiled)
    assert table2.split("Speed settings not applied in full:\n")[1].strip().splitlines() == [
        f"- {label} seed {seed} on MNIST5k (speed settings fp32, compile default): train_step ran eagerly under "
        f"--compile default: Unsupported: data-dependent branch"]
    assert table2.count("Some trials ran part of their code eagerly") == 1  # the compiled table's caption only
    assert "Speed settings not applied" not in render_table2(eager)  # nothing fell back: no list


def test_warnings_of_a_seed_given_twice_are_those_of_the_trial_the_table_holds():
    records = copy.deepcopy(load("mnist")[0])
    earlier = {**copy.deepcopy(records[0]), "trial_id": "an-earlier-copy", "warnings": ["the dropped copy's"]}
    text = render_table1([earlier] + records)  # the later record of the same row, dataset and seed is used
    assert "the dropped copy's" not in text


def test_time_to_accuracy_targets_given_twice_are_one_column():
    assert parse_targets("90,95,90") == (90.0, 95.0)


def test_figure3_with_one_seed_promises_no_band():
    from noprop_bench.report.figures import figure3

    records, _ = load("mnist")
    assert "band: min–max over seeds" in figure3(records)._suptitle.get_text().replace("\n", " ")
    one_seed = [r for r in records if r["seed"] == records[0]["seed"]]
    title = figure3(one_seed)._suptitle.get_text().replace("\n", " ")
    assert "line: the one seed's curve (no band: one seed)" in title and "min–max" not in title
    # several seeds of other trials do not make a band of a line drawn from one seed
    other_seed = {**copy.deepcopy(one_seed[0]), "seed": 99, "trial_id": "another-seed", "row_label": "Other"}
    other_seed["params"] = {**other_seed.get("params", {}), "lr": 0.123}
    assert "min–max" in figure3(one_seed + [other_seed, {**other_seed, "seed": 98, "trial_id": "x"}]
                                )._suptitle.get_text().replace("\n", " ")


def test_paper_caption_promises_no_paper_columns_for_a_dataset_the_paper_lacks():
    records = [{**r, "dataset": "fashion_mnist", "dataset_label": "F-MNIST"} for r in load("mnist")[0]]
    text = render_table1(records, paper=True)
    assert "No paper columns: the paper's Table 1 has no column for F-MNIST." in text
    assert "(paper)" not in text and "Paper columns:" not in text
    assert "Paper columns: Li, Teh, Pascanu (2025)" in render_table1(load("mnist")[0], paper=True)
    mixed = render_table1(load("mnist")[0] + [{**r, "dataset": "fashion_mnist", "dataset_label": "F-MNIST"}
                                              for r in load("mnist")[0]], paper=True)
    assert "for reference (none for F-MNIST: not in the paper's Table 1)." in mixed


def test_table2_speaks_of_how_noprop_dt_and_backprop_dt_hold_memory_only_when_they_are_in_it():
    records = [r for r in load("mixed")[0] if r.get("memory_kind") == "cuda_max_allocated"]
    assert records and "NoProp-DT keeps all T blocks" not in render_table2(records)
    with_dt = records + [{**copy.deepcopy(records[0]), "method": "noprop_dt", "trial_id": "dt", "row_label": "DT"}]
    text = render_table2(with_dt)
    assert "NoProp-DT keeps all T blocks and their AdamW moments there unless run with offload=true" in text
    assert "Backprop (backprop_dt)" not in text


def test_report_json_gives_the_difference_to_the_paper_where_table1_does():
    from noprop_bench.report.summary import summary

    records, _ = load("mnist")
    ct = [r for r in records if r["row_label"] == "NoProp-CT (one-hot)"]
    protocol = {"name": "paper", "overrides": []}
    clean = [{**ct[0], "preset": protocol}, {**ct[1], "preset": protocol},
             {**ct[1], "seed": 2, "trial_id": "third-seed", "preset": protocol}]
    others = [r for r in records if r["row_label"] != "NoProp-CT (one-hot)"]
    cells = _cells(render_table1(clean + others, paper=True))
    by_row = {c["row"]: c for t in summary(clean + others, paper=True)["table1"] for c in t["cells"]
              if c["split"] == "test"}
    assert f"{by_row['NoProp-CT (one-hot)']['paper']['delta']:+.2f}" == cells["NoProp-CT (one-hot)"][2]
    assert by_row["NoProp-CT (dim=20)"]["paper"]["delta"] is None  # not run under the protocol: no Δ


def test_only_the_papers_named_budget_shares_a_table_across_amounts():
    """``100epochs (paper)`` and ``4epochs (paper)`` are one protocol; records naming another budget (written by
    hand: the command line refuses names) keep their amounts apart."""
    records, _ = load("mixed")
    base = [r for r in records if r["budget"] == "20000samples"]
    trials = []
    for budget in ("1steps (x)", "100steps (x)", "100epochs (paper)", "4epochs (paper)"):
        for record in base:
            trial = copy.deepcopy(record)
            trial.update(budget=budget, budget_unit=budget.split(" ")[0].lstrip("0123456789"),
                         trial_id=f"{record['trial_id']}-{budget}")
            trials.append(trial)
    text = render_table1(trials)
    assert text.count("| Method") == 3
    assert "Budget 1steps (x) of training" in text and "Budget 100steps (x) of training" in text
    assert text.count("Budget the paper's epochs per method") == 1


def test_captions_say_how_far_trials_ran_past_their_budget():
    """A trial ends with the step that reaches its budget: a method with slow steps trains longer, which a
    caption naming the budget alone hides."""
    from noprop_bench.report.records import overshoot_text

    records = [{"budget": "1s", "train_seconds": 1.2}, {"budget": "1s", "train_seconds": 1.5}]
    assert overshoot_text(records) == " (trials spent 1.20-1.50s: each ends with the step that reaches the budget)"
    long = [{"budget": "1800s", "train_seconds": 1830}, {"budget": "1800s", "train_seconds": 1842.4}]
    assert overshoot_text(long) == " (trials spent 1830.0-1842.4s: each ends with the step that reaches the budget)"
    epochs = [{"budget": "100epochs", "epochs": 101.2}, {"budget": "100epochs", "epochs": 101.4}]
    assert "trials spent 101.20-101.40 epochs" in overshoot_text(epochs)
    assert overshoot_text([{"budget": "60s", "train_seconds": 60.4}]) == ""  # within 1%
    assert overshoot_text([{"budget": "300samples", "samples": 384}]) == (
        " (trials spent 384 samples: each ends with the step that reaches the budget)")
    assert overshoot_text([{"budget": "100epochs (paper)", "epochs": 130.0}]) == ""  # amounts differ per method


def test_a_trial_not_in_the_tables_names_its_budget_when_no_table_has_it():
    records = copy.deepcopy(load("mnist")[0][:2])
    records[1].update(status="failed", error="RuntimeError: boom", budget="1024samples", trial_id="other")
    listed = render_table1(records).split("Not in the table:\n")[1].strip().splitlines()
    assert listed == [f"- {records[1]['row_label']} seed {records[1]['seed']} on MNIST5k with budget 1024samples: "
                      f"failed (RuntimeError: boom)"]
    records[1]["budget"] = records[0]["budget"]  # one of the tables': no need to say it
    assert "with budget" not in render_table1(records)
    records[0]["budget"], records[1]["budget"] = "100epochs (paper)", "2epochs (paper)"  # one protocol, one table
    assert "with budget" not in render_table1(records)


def test_a_cell_does_not_depend_on_the_order_the_trials_were_recorded_in():
    """Executors record trials in the order they finish. Summed in that order, these four accuracies give a
    mean of 7.475 that prints as 7.47 one way round and 7.48 the other."""
    import itertools

    from noprop_bench.report.records import format_mean_se, mean_and_standard_error

    values = [13.1, 5.7, 5.5, 5.6]
    assert len({f"{np.mean(np.array(order)):.2f}" for order in itertools.permutations(values)}) == 2
    assert len({format_mean_se(list(order)) for order in itertools.permutations(values)}) == 1
    assert len({mean_and_standard_error(order) for order in itertools.permutations(values)}) == 1


def test_a_group_not_split_by_device_names_none_in_its_heading():
    from noprop_bench.report.records import comparable_groups, group_distinctions

    common = {"backbone": "noprop_cnn", "batch_size": 128, "environment": {"device_name": "cpu (x86_64)"},
              "dataset": "mnist5k", "seed": 0, "method": "backprop"}
    records = [{**common, "budget": "3", "budget_unit": "seconds"},
               {**common, "budget": "200samples", "budget_unit": "samples"}]
    assert group_distinctions(comparable_groups(records)) == ["budget 3, device cpu (x86_64)", "budget 200samples"]


def test_a_pipe_in_a_heading_or_cell_is_escaped_in_markdown():
    import pandas as pd

    from noprop_bench.report.records import markdown

    text = markdown(pd.DataFrame({"Method": ["Backprop"], "cats|dogs test": ["90.00"]}))
    heading, rule, row = text.splitlines()
    assert "cats\\|dogs test" in heading and heading.count(" | ") == 1  # two cells, not three
    assert rule.count("|") == 3 and row.count(" | ") == 1


def test_warnings_and_failures_name_two_folders_of_one_name_as_their_columns_do():
    records = copy.deepcopy(load("mnist")[0])[:2]
    for record, folder in zip(records, ("/a/good", "/b/good")):
        record.update(dataset=f"imagefolder:{folder}", dataset_label="good", warnings=["a warning"])
    failed = {**copy.deepcopy(records[1]), "status": "failed", "error": "boom", "trial_id": "f"}
    del failed["dataset_label"]  # as the host records a trial whose worker died
    text = render_table1(records + [failed])
    assert "good (imagefolder:/a/good) test" in text and "good (imagefolder:/b/good) test" in text
    assert f"seed {records[0]['seed']} on good (imagefolder:/a/good): a warning" in text
    assert f"seed {records[1]['seed']} on good (imagefolder:/b/good): a warning" in text
    assert f"seed {failed['seed']} on good (imagefolder:/b/good): failed (boom)" in text


@pytest.mark.parametrize("field, value, says", [
    ("seed", "zero", "seed 'zero' is not a whole number"),  # it counted as one more seed
    ("budget", "garbage", "budget 'garbage' is not a budget noprop-bench writes"),  # a caption said 'Budget garbage'
    ("samples_per_second", "fast", "samples_per_second 'fast': not a number"),  # Table 2 left the seed out silently
    ("test_acc", float("nan"), "test_acc nan: not a number"),
])
def test_a_record_with_a_value_of_the_wrong_kind_is_skipped_and_named(field, value, says):
    from noprop_bench.report.records import check_records

    records = copy.deepcopy(load("mnist")[0])
    records[0][field] = value
    kept, notes = check_records(records)
    assert len(kept) == len(records) - 1
    assert len(notes) == 1 and notes[0].endswith(f"{says}; skipped")


def test_two_methods_of_one_label_get_rows_of_their_own():
    """A plugin's variant (another train_step, the same label and defaults) shared the original's row, and
    the table showed one of the two results."""
    from noprop_bench.report.records import assign_rows

    records = copy.deepcopy(load("mnist")[0])[:1]
    twin = {**copy.deepcopy(records[0]), "method": f"{records[0]['method']}_v3", "trial_id": "twin", "test_acc": 11.0}
    rows = assign_rows(records + [twin])
    assert rows == [f"{records[0]['row_label']} [method={records[0]['method']}]",
                    f"{records[0]['row_label']} [method={twin['method']}]"]
    assert rows[1] in render_table1(records + [twin])


def test_a_folder_whose_run_left_a_plan_but_no_record_says_so(tmp_path, capsys):
    from noprop_bench.run.store import TrialStore

    TrialStore(tmp_path).write_plan("noprop-bench", [{"trial_id": "x", "trial": "Backprop seed 0", "dataset": "MNIST5k"}])
    assert report_main([str(tmp_path)]) == 2
    assert "the last command planned 1 trial(s) there, and none left a record" in capsys.readouterr().err
