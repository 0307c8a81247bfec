"""Regression checks against a saved baseline: slower or less accurate methods fail the run."""

import json
import re
import time
import types

import pandas as pd
import pytest
import torch

import fake_plugins
from noprop_bench import UsageError

RUN = ("--budget", "15steps", "--seeds", "2", "--checkpoints", "0")
# step times are sleeps, so relative throughput is stable even on a busy machine
SAME = "steady[predict_sleep=0,step_sleep=0.03],sleepy[predict_sleep=0,step_sleep=0.03]"
SETTINGS = " [predict_sleep=0.0, step_sleep=0.03]"  # the row labels name the parameters that are not defaults


def sleepy_changed(monkeypatch, step):
    """A code change to Sleepy alone (Steady inherits its train_step): the same command then measures it."""
    original = fake_plugins.Sleepy.train_step

    def changed(self, x, y):
        return step(self, x, y) if type(self) is fake_plugins.Sleepy else original(self, x, y)

    monkeypatch.setattr(fake_plugins.Sleepy, "train_step", changed)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    from noprop_bench.cli import run
    base = tmp_path_factory.mktemp("base")
    path = base / "baseline.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    code = run(["--plugin", "fake_plugins", "--dataset", "tiny", "--methods", SAME, *RUN,
                "--save-baseline", str(path), "--out", str(base / "run")])
    torch.set_num_threads(threads)
    assert code == 0
    return path


def test_saved_baseline_states_its_tolerances_and_command(baseline):
    saved = json.loads(baseline.read_text())
    assert saved["tolerance"]["accuracy_standard_errors"] == 3.0
    assert saved["tolerance"]["throughput_ratio"] == 0.6
    assert saved["reference_method"] == "steady" and saved["budget"] == "15steps"
    assert "--save-baseline" in saved["command"]
    assert set(saved["rows"]) == {"tiny / Steady" + SETTINGS, "tiny / Sleepy" + SETTINGS}
    assert all(row["accuracy_seeds"] == 2 and row["accuracy_seed_se"] >= 0 for row in saved["rows"].values())
    assert (saved["seeds"], saved["inference_runs"], saved["device_type"], saved["speed"], saved["augment"],
            saved["threads"]) == ([0, 1], None, "cpu", "eager fp32", {"tiny": "none"}, 1)  # no method samples
    assert saved["datasets"] == ["tiny"]


def test_tolerance_comes_from_the_seed_level_spread_with_a_floor():
    from noprop_bench.report.baseline import DEFAULT_TOLERANCE, accuracy_allowance
    # pooled s.e. 0.5 (inference runs of one model), seed-level s.e. 1.2: the seed level sets the tolerance
    assert accuracy_allowance({"accuracy_se": 0.5, "accuracy_seed_se": 1.2}, DEFAULT_TOLERANCE) == pytest.approx(3.6)
    assert accuracy_allowance({"accuracy_se": 0.5, "accuracy_seed_se": 0.1}, DEFAULT_TOLERANCE) == 1.0  # the floor
    assert accuracy_allowance({"accuracy_se": 0.5}, {**DEFAULT_TOLERANCE, "accuracy_cap_points": None}) == \
        pytest.approx(1.5)  # an older baseline: pooled s.e., no cap
    # NoProp-CT's two seeds in the CI baseline differ by 15.8 points (s.e. 7.9): the cap keeps a 5-point loss visible
    assert accuracy_allowance({"accuracy_se": 4.58, "accuracy_seed_se": 7.9}, DEFAULT_TOLERANCE) == 4.0


def test_same_code_passes(fake_run, baseline, tmp_path, capsys):
    code, out = fake_run("--methods", SAME, *RUN,
                         "--baseline", str(baseline), out=tmp_path / "again")
    assert code == 0, capsys.readouterr().err
    assert "no regression" in capsys.readouterr().err
    assert "| ok" in (out / "regression.md").read_text()


def test_a_baseline_records_its_environment_and_a_run_in_another_is_compared_with_a_note(fake_run, baseline,
                                                                                        tmp_path, capsys):
    """Across torch versions or CPU instruction sets, CPU kernels round differently: the check still runs (the
    tolerances absorb rounding), but says so, so a failing row is not blamed on the code alone."""
    from noprop_bench.run.store import cpu_capability
    saved = json.loads(baseline.read_text())
    assert saved["environment"] == {"torch": torch.__version__, "cpu_capability": cpu_capability()}
    code, out = fake_run("--methods", SAME, *RUN, "--baseline", str(baseline), out=tmp_path / "same")
    assert code == 0 and "environment differs" not in capsys.readouterr().err
    assert "environment differs" not in (out / "regression.md").read_text()

    other = tmp_path / "other-machine.json"
    other.write_text(json.dumps({**saved, "environment": {"torch": "2.0.1", "cpu_capability": "AVX2"}}))
    code, out = fake_run("--methods", SAME, *RUN, "--baseline", str(other), out=tmp_path / "same")  # reruns nothing
    note = (f"environment differs from the baseline's: torch {torch.__version__} (baseline: 2.0.1); CPU kernels "
            f"{cpu_capability()} (baseline: AVX2).")
    assert code == 0 and note in capsys.readouterr().err
    assert note in (out / "regression.md").read_text()


def test_an_environment_field_known_to_one_side_only_is_no_difference():
    from noprop_bench.report.baseline import environment_differences, record_environment

    records = [{**_ct_record(seed, 1e-3, 97.0), "environment": {"device": "cpu", "torch": "2.11.0"}}
               for seed in (0, 1)]
    assert record_environment(records) == {"torch": "2.11.0"}  # records made before cpu_capability was stored
    assert environment_differences({"environment": {"torch": "2.11.0", "cpu_capability": "AVX2"}}, records) == []
    assert environment_differences({}, records) == []  # a baseline saved before environments were
    resumed = [records[0], {**records[1], "environment": {"device": "cpu", "torch": "2.14.1"}}]
    assert environment_differences({"environment": {"torch": "2.11.0"}}, resumed) == \
        ["torch 2.11.0 and 2.14.1 (baseline: 2.11.0)"]
    on_gpu = [{**r, "environment": {"device": "cuda:0", "device_name": "NVIDIA H100", "cpu_capability": "AVX2",
                                    "torch": "2.11.0"}} for r in records]
    assert record_environment(on_gpu) == {"torch": "2.11.0", "device_name": "NVIDIA H100"}  # the GPU, not the CPU
    assert environment_differences({"environment": {"device_name": "NVIDIA A100"}}, on_gpu) == \
        ["GPU NVIDIA H100 (baseline: NVIDIA A100)"]


def test_a_method_twice_as_slow_fails(fake_run, baseline, tmp_path, capsys, monkeypatch):
    original = fake_plugins.Sleepy.train_step

    def twice_as_slow(self, x, y):
        time.sleep(self.params["step_sleep"])
        return original(self, x, y)

    sleepy_changed(monkeypatch, twice_as_slow)
    code, out = fake_run("--methods", SAME, *RUN,
                         "--baseline", str(baseline), out=tmp_path / "slow")
    assert code == 3
    err = capsys.readouterr().err
    assert f"tiny / Sleepy{SETTINGS}: throughput relative to steady fell to" in err
    assert "Steady" not in err.split("failed the check:")[1]


def test_a_method_that_stops_learning_fails(fake_run, baseline, tmp_path, capsys, monkeypatch):
    def no_update(self, x, y):
        time.sleep(self.params["step_sleep"])
        return {"loss": torch.tensor(1.0)}

    sleepy_changed(monkeypatch, no_update)
    code, out = fake_run("--methods", SAME, *RUN,
                         "--baseline", str(baseline), out=tmp_path / "broken")
    assert code == 3
    assert f"tiny / Sleepy{SETTINGS}: accuracy fell" in capsys.readouterr().err
    assert "accuracy fell" in (out / "regression.md").read_text()


def test_baseline_with_other_settings_is_refused_before_training(fake_run, baseline, tmp_path):
    with pytest.raises(UsageError, match="budget '6steps' differs from the baseline's '15steps'") as refused:
        fake_run("--methods", "linear", "--budget", "6steps", "--seeds", "2", "--baseline", str(baseline),
                 out=tmp_path / "other")
    assert not (tmp_path / "other").exists()
    # the command it suggests is the baseline's own, less the --save-baseline that would overwrite it
    assert "--budget 15steps" in str(refused.value) and "--save-baseline" not in str(refused.value)


@pytest.mark.parametrize("flags, message", [
    (("--seeds", "1"), "seeds [0] differs from the baseline's [0, 1]"),
    (("--seeds", "2", "--augment", "crop_flip"), "augment {'tiny': 'crop_flip'} differs from the baseline's"),
    (("--seeds", "2", "--precision", "bf16"), "speed 'eager bf16' differs from the baseline's 'eager fp32'"),
])
def test_a_run_with_other_seeds_augmentation_or_speed_settings_is_refused_before_training(
        fake_run, baseline, tmp_path, flags, message):
    # one seed of a run is not comparable with the baseline's mean over two
    with pytest.raises(UsageError, match=re.escape(message)):
        fake_run("--methods", SAME, "--budget", "15steps", "--checkpoints", "0", *flags, "--baseline", str(baseline),
                 out=tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_a_cpu_run_with_another_thread_count_is_not_compared(fake_run, baseline, tmp_path):
    """CPU results are deterministic for a seed and a thread count, not across thread counts: refused before
    training, as the executor knows the threads its trials get; and a rerun into an --out whose finished
    trials ran with other threads (they are kept, not trained again) is refused before training too."""
    with pytest.raises(UsageError, match=re.escape("threads 2 differs from the baseline's 1")):
        fake_run("--methods", SAME, *RUN, "--threads", "2", "--baseline", str(baseline), out=tmp_path / "two")
    assert not (tmp_path / "two").exists()
    code, _ = fake_run("--methods", SAME, *RUN, "--threads", "2", out=tmp_path / "two")
    assert code == 0
    with pytest.raises(UsageError, match=re.escape(f"--out {tmp_path / 'two'} already holds finished trials of "
                                                   f"this run, kept with the threads they ran with: the run's "
                                                   f"threads 2 differs from the baseline's 1")) as refused:
        fake_run("--methods", SAME, *RUN, "--threads", "1", "--baseline", str(baseline), out=tmp_path / "two")
    assert str(refused.value).endswith("; or rerun into a new --out")
    assert len((tmp_path / "two" / "trials.jsonl").read_text().splitlines()) == 4  # nothing trained again


def test_a_baseline_saved_before_a_setting_was_stored_is_not_checked_on_it(fake_run, baseline, tmp_path):
    old = json.loads(baseline.read_text())
    for key in ("seeds", "inference_runs", "device_type", "speed", "augment", "threads"):
        del old[key]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    code, _ = fake_run("--methods", SAME, *RUN, "--baseline", str(path), out=tmp_path / "run")
    assert code == 0


def _ct_record(seed, lr, accuracy, samples_per_second=1000.0, method="noprop_ct"):
    return {"status": "ok", "trial_id": f"{method}-{lr}-{seed}", "method": method, "family": "continuous-time",
            "row_label": "NoProp-CT (one-hot)" if method == "noprop_ct" else "Backprop with linear head",
            "params": {"embedding": "one-hot", "lr": lr}, "dataset": "mnist5k", "seed": seed,
            "test_acc_runs": [accuracy], "samples_per_second": samples_per_second, "budget": "60s",
            "backbone": "noprop_cnn", "batch_size": 128, "inference_runs": 1, "environment": {}}


def test_two_configurations_of_a_method_are_two_baseline_rows_as_in_table_1():
    """Pooled, a 7-point fall of one configuration hid inside the other's spread."""
    from noprop_bench.report.baseline import compare, regressions, summarise

    then = [_ct_record(seed, lr, accuracy) for seed in (0, 1)
            for lr, accuracy in ((1e-3, 97.0), (1e-4, 50.0))]
    baseline = {**summarise(then), "tolerance": {"accuracy_floor_points": 1.0, "accuracy_standard_errors": 2.0}}
    assert sorted(baseline["rows"]) == ["mnist5k / NoProp-CT (one-hot) [lr=0.0001]",
                                        "mnist5k / NoProp-CT (one-hot) [lr=0.001]"]
    now = [_ct_record(seed, lr, 90.0 if lr == 1e-3 else 50.0) for seed in (0, 1) for lr in (1e-3, 1e-4)]
    failed = regressions(compare(now, baseline))
    assert list(failed["row"]) == ["mnist5k / NoProp-CT (one-hot) [lr=0.001]"]
    assert "accuracy fell 7.00 points" in failed["verdict"].iloc[0]


def test_a_configuration_that_diverged_does_not_rename_the_others_row():
    from noprop_bench.report.baseline import compare, regressions, summarise

    then = [_ct_record(seed, lr, accuracy) for seed in (0, 1) for lr, accuracy in ((1e-3, 97.0), (1e-4, 50.0))]
    baseline = {**summarise(then), "tolerance": {"accuracy_floor_points": 1.0, "accuracy_standard_errors": 2.0}}
    now = [_ct_record(seed, 1e-3, 97.0) for seed in (0, 1)]
    now += [{**_ct_record(seed, 1e-4, 0.0), "status": "diverged", "test_acc_runs": None} for seed in (0, 1)]
    verdicts = dict(zip(compare(now, baseline)["row"], compare(now, baseline)["verdict"]))
    assert verdicts["mnist5k / NoProp-CT (one-hot) [lr=0.001]"] == "ok"  # still found and compared
    assert verdicts["mnist5k / NoProp-CT (one-hot) [lr=0.0001]"] == \
        "no trial finished ok in this run: diverged (2 of 2 trials)"  # it ran: not "missing"
    assert len(regressions(compare(now, baseline))) == 1


def test_a_baseline_is_saved_only_when_every_trial_finished_ok(tmp_path):
    """A resumed run skips its diverged trials as finished: saving then left their row out of the baseline,
    and CI stopped checking that method without a word."""
    from noprop_bench.errors import UsageError
    from noprop_bench.report.baseline import save_baseline

    records = [_ct_record(0, 1e-3, 97.0), {**_ct_record(1, 1e-3, 0.0), "status": "diverged", "test_acc_runs": None}]
    with pytest.raises(UsageError, match="every trial must finish ok.*mnist5k / NoProp-CT \\(one-hot\\): diverged "
                                         "\\(1 of 2 trials\\)"):
        save_baseline(records, tmp_path / "b.json", "noprop-bench ...")
    assert not (tmp_path / "b.json").exists()


@pytest.mark.parametrize("edit, problem", [
    (lambda b: b["rows"]["mnist5k / NoProp-CT (one-hot)"].pop("accuracy_se"), "accuracy_se must be a finite number"),
    # NaN compares false with everything: the row passed as "no regression" whatever the run measured
    (lambda b: b["rows"]["mnist5k / NoProp-CT (one-hot)"].update(accuracy_mean=float("nan")),
     "accuracy_mean must be a finite number"),
    (lambda b: b["rows"]["mnist5k / NoProp-CT (one-hot)"].update(accuracy_se=-50.0),
     "accuracy_se must not be negative"),
    (lambda b: b["rows"]["mnist5k / NoProp-CT (one-hot)"].update(relative_throughput=float("inf")),
     "relative_throughput must be a finite number or null"),
    (lambda b: b.update(tolerance={"accuracy_floor_points": float("nan")}), "tolerance accuracy_floor_points must be a "
                                                                            "finite number"),
    (lambda b: b.update(rows={}), "rows must be a non-empty object"),
    (lambda b: b.pop("reference_method"), "reference_method must be a method name"),
    (lambda b: b.update(tolerance={"throughput_ratio": "0.6"}), "tolerance throughput_ratio must be a finite number"),
    (lambda b: b.update(tolerance={"accuracy_floor_points": -5}), "tolerance accuracy_floor_points must not be "
                                                                    "negative"),
    (lambda b: b.update(tolerance={"throughput_ratio": 1.5}), "throughput_ratio must be at most 1"),
    (lambda b: b.update(environment="torch 2.11"), "environment must be an object"),
])
def test_a_hand_edited_baseline_missing_a_field_is_refused_before_training(tmp_path, edit, problem):
    """Before, every trial trained and then the comparison raised a KeyError (exit 1, no regression.md)."""
    from noprop_bench.errors import UsageError
    from noprop_bench.report.baseline import load_baseline, save_baseline

    path = tmp_path / "b.json"
    saved = save_baseline([_ct_record(seed, 1e-3, 97.0) for seed in (0, 1)], path, "noprop-bench ...")
    edit(saved)
    path.write_text(json.dumps(saved))
    with pytest.raises(UsageError, match=f"--baseline {path}: .*{problem}"):
        load_baseline(path)


def test_a_hand_edited_baseline_with_a_huge_integer_is_read_not_a_traceback(tmp_path):
    """JSON integers have no size limit; a finiteness check through numpy raised TypeError on one."""
    from noprop_bench.report.baseline import load_baseline, save_baseline

    path = tmp_path / "b.json"
    saved = save_baseline([_ct_record(seed, 1e-3, 97.0) for seed in (0, 1)], path, "noprop-bench ...")
    saved["rows"]["mnist5k / NoProp-CT (one-hot)"]["accuracy_mean"] = 10 ** 20
    path.write_text(json.dumps(saved))
    assert load_baseline(path)["rows"]["mnist5k / NoProp-CT (one-hot)"]["accuracy_mean"] == 10 ** 20


def test_run_settings_that_differ_are_named_as_they_are():
    from noprop_bench.errors import UsageError
    from noprop_bench.report.baseline import check_compatible, record_settings, summarise

    one_thread = [{**_ct_record(seed, 1e-3, 97.0), "environment": {"device": "cpu", "threads": 1}} for seed in (0, 1)]
    baseline = {**summarise(one_thread), "command": "noprop-bench --methods noprop_ct --out /tmp/base-run --seeds 2"}
    mixed = [one_thread[0], {**one_thread[1], "environment": {"device": "cpu", "threads": 2}}]  # a resumed run
    with pytest.raises(UsageError, match="the run's threads \\[1, 2\\] differs from the baseline's 1") as refused:
        check_compatible(baseline, record_settings(mixed))
    assert "--out" not in str(refused.value)  # rerun there and every trial is skipped: the baseline against itself
    other_data = [{**r, "dataset": "imagefolder:/data/x"} for r in one_thread]
    with pytest.raises(UsageError, match="the run's datasets \\['imagefolder:/data/x'\\] differs from the "
                                         "baseline's \\['mnist5k'\\]"):
        check_compatible(baseline, record_settings(other_data))
    folder_baseline = {**summarise([{**r, "dataset": "imagefolder:/home/a/pets"} for r in one_thread]),
                       "command": baseline["command"]}
    with pytest.raises(UsageError, match="named by its absolute path: the folder must be at the baseline's path"):
        check_compatible(folder_baseline, record_settings(other_data))
    # a baseline of methods that do not sample says nothing of inference runs: a sampling method may join
    assert baseline["inference_runs"] is None
    sampling = [{**r, "stochastic": True, "inference_runs": 5} for r in one_thread]
    check_compatible(baseline, record_settings(one_thread + sampling))


def test_relative_speed_needs_one_reference_row():
    from noprop_bench.report.baseline import summarise

    one = summarise([_ct_record(0, 1e-3, 90.0, 500.0), _ct_record(0, 1e-3, 95.0, 1000.0, method="backprop")])
    assert one["rows"]["mnist5k / NoProp-CT (one-hot)"]["relative_throughput"] == 0.5
    two = summarise([_ct_record(0, 1e-3, 90.0, 500.0), _ct_record(0, 1e-3, 95.0, 1000.0, method="backprop"),
                     _ct_record(0, 1e-4, 95.0, 2000.0, method="backprop")])
    assert all(row["relative_throughput"] is None for row in two["rows"].values())


@pytest.mark.parametrize("content, message", [("{not json", "not valid JSON"), (b"\xff\xfe{}", "not valid JSON"),
                                              (None, "cannot be read (Is a directory)")])
def test_unreadable_baseline_is_bad_input(tmp_path, capsys, content, message):
    from noprop_bench.cli import main
    bad = tmp_path / "bad.json"
    if content is None:
        bad.mkdir()
    else:
        bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(SystemExit) as stopped:
        main(["--plugin", "fake_plugins", "--dataset", "tiny", "--methods", "linear", "--baseline", str(bad)])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


# lr 1e-3 -> 8.5e-4 costs NoProp-CT about 6 points at this budget (measured: 40.75 -> 34.80 % on a 2-core x86_64
# CPU with one thread; the steps and the evaluation are deterministic there for a seed and thread count)
DEGRADED_LR, DEGRADED_FALL = 0.00085, (3.0, 9.0)
CT_RUN = ["--dataset", "mnist5k", "--budget", "16384samples", "--seeds", "1", "--checkpoints", "0",
          "--inference-runs", "2", "--threads", "1"]


def run_keeping_threads(argv):
    """The CLI in-process; ``--threads`` sets torch's thread count for the process, so restore it after."""
    import torch
    from noprop_bench.cli import run
    threads = torch.get_num_threads()
    try:
        return run(argv)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ct_baseline(tmp_path_factory):
    """NoProp-CT's baseline at its default learning rate (1e-3), one seed: the tolerance is the 1-point floor."""
    folder = tmp_path_factory.mktemp("ct")
    path = folder / "ct.json"
    assert run_keeping_threads(["--methods", "noprop_ct[steps=50]", *CT_RUN, "--save-baseline", str(path),
                "--out", str(folder / "good")]) == 0
    return path


def ct_check(path, tmp_path):
    code = run_keeping_threads(["--methods", "noprop_ct[steps=50]", *CT_RUN,
                                "--baseline", str(path), "--out", str(tmp_path / "run")])
    return code, (tmp_path / "run" / "regression.md").read_text()


def test_a_method_run_with_another_parameter_is_another_row_and_fails_the_check(fake_run, tmp_path, capsys):
    baseline = tmp_path / "linear.json"
    run = ("--budget", "64samples", "--checkpoints", "0", "--threads", "1")
    code, _ = fake_run("--methods", "linear", *run, "--save-baseline", str(baseline))
    assert code == 0
    code, _ = fake_run("--methods", "linear[lr=0]", *run, "--baseline", str(baseline), out=tmp_path / "lr0")
    assert code == 3
    assert ("tiny / Linear (one-hot): missing from this run, which has tiny / Linear (one-hot) [lr=0.0] "
            "instead" in capsys.readouterr().err)


def test_noprop_ct_broken_through_its_code_fails_the_check(ct_baseline, tmp_path, capsys, monkeypatch):
    """The regression check catches a NoProp-CT whose code changed what it learns (its default learning rate)
    in the same row: here a break of only a few points, so a NoProp-CT that no longer learns at all (the
    learning rate 0 of the original deliberate break) falls further through the same check. (A changed
    parameter is another configuration and fails as one: the fake-method test above.)"""
    from noprop_bench_plugins.methods.noprop_ct import NoPropCT

    assert json.loads(ct_baseline.read_text())["rows"]["mnist5k / NoProp-CT (one-hot) [steps=50]"]["accuracy_mean"] > 25
    monkeypatch.setitem(NoPropCT.defaults, "lr", DEGRADED_LR)
    code, table = ct_check(ct_baseline, tmp_path)
    fell = float(re.search(r"accuracy fell ([0-9.]+) points", table).group(1))
    assert code == 3 and DEGRADED_FALL[0] <= fell <= DEGRADED_FALL[1], table
    assert "mnist5k / NoProp-CT (one-hot) [steps=50]: accuracy fell" in capsys.readouterr().err


def test_a_run_with_a_failed_trial_says_it_did_not_check_or_save_the_baseline(fake_run, tmp_path, capsys):
    code, out = fake_run("--methods", "linear,explode", "--budget", "64samples", "--checkpoints", "0",
                         "--save-baseline", str(tmp_path / "new.json"))
    assert code == 1 and not (tmp_path / "new.json").exists()
    assert (f"not done, as not every trial finished ok: --save-baseline {tmp_path / 'new.json'} (rerun the same "
            f"command: failed and interrupted trials are trained again)") in capsys.readouterr().err
    code, _ = fake_run("--methods", "linear,nan_loss", "--budget", "64samples", "--checkpoints", "0",
                       "--save-baseline", str(tmp_path / "new.json"), out=tmp_path / "diverging")
    assert code == 1 and ("(a diverged trial is kept as finished: another --out, or other settings, trains it anew)"
                          in capsys.readouterr().err)


def test_a_row_that_diverged_fails_the_check_and_rows_the_baseline_lacks_are_listed_unchecked(fake_run, tmp_path,
                                                                                                capsys):
    run = ("--budget", "64samples", "--checkpoints", "0", "--threads", "1")
    base = tmp_path / "base.json"
    code, _ = fake_run("--methods", "linear", *run, "--save-baseline", str(base))
    assert code == 0
    code, diverged = fake_run("--methods", "linear,nan_loss", *run, out=tmp_path / "first")
    assert code == 1
    nan = next(json.loads(line) for line in (diverged / "trials.jsonl").read_text().splitlines()
               if '"nan_loss"' in line)
    assert nan["status"] == "diverged"
    capsys.readouterr()
    # the baseline lacks the diverging row: listed, not checked; the run still exits 1 for its diverged trial
    code, out = fake_run("--methods", "linear,nan_loss", *run, "--baseline", str(base), out=tmp_path / "lacking")
    table = (out / "regression.md").read_text()
    assert code == 1 and "no regression against" in capsys.readouterr().err
    assert "not in the baseline: not checked (diverged (1 of 1 trials))" in table
    # rerun into the same --out: the diverged trial is kept as finished, and still exits 1
    assert fake_run("--methods", "linear,nan_loss", *run, "--baseline", str(base), out=tmp_path / "lacking")[0] == 1
    # with --save-baseline too: compared, not saved, and said so
    new = tmp_path / "new.json"
    code, _ = fake_run("--methods", "linear,nan_loss", *run, "--baseline", str(base), "--save-baseline", str(new),
                       out=tmp_path / "both")
    assert code == 1 and not new.exists()
    assert f"not done, as not every trial finished ok: --save-baseline {new}" in capsys.readouterr().err
    # with a row for it (as when it learned once), the diverged row is a regression: exit 3
    saved = json.loads(base.read_text())
    (linear,) = saved["rows"].values()
    saved["rows"][f"{nan['dataset']} / {nan['row_label']}"] = {**linear, "method": "nan_loss"}
    base.write_text(json.dumps(saved))
    code, out = fake_run("--methods", "linear,nan_loss", *run, "--baseline", str(base), out=tmp_path / "diverging")
    assert code == 3
    assert "no trial finished ok in this run: diverged (1 of 1 trials)" in (out / "regression.md").read_text()
    assert "row(s) failed the check" in capsys.readouterr().err
    # no trial of the run finished ok at all: still compared, every row failing
    code, out = fake_run("--methods", "nan_loss", *run, "--baseline", str(base), out=tmp_path / "all-diverged")
    assert code == 3 and "no trial finished ok in this run: diverged" in (out / "regression.md").read_text()


def test_rows_of_the_reference_method_with_other_parameters_leave_its_default_row_the_reference():
    from noprop_bench.report.baseline import summarise

    def record(seed, method, params, speed):
        defaults = {"lr": 1e-3}
        return {**_ct_record(seed, params["lr"], 90.0, samples_per_second=speed, method=method),
                "params": params, "param_defaults": defaults}

    default, variant, ct = (record(0, "backprop", {"lr": 1e-3}, 1000.0), record(0, "backprop", {"lr": 1e-2}, 500.0),
                            record(0, "noprop_ct", {"lr": 1e-3}, 2000.0))
    speeds = lambda records: sorted(row["relative_throughput"] for row in summarise(records)["rows"].values())  # noqa
    assert speeds([default, variant, ct]) == [0.5, 1.0, 2.0]  # relative to backprop at its defaults
    assert speeds([variant, ct]) == [1.0, 4.0]  # its only row
    other_variant = record(0, "backprop", {"lr": 1e-1}, 250.0)
    assert [row["relative_throughput"] for row in summarise([variant, other_variant, ct])["rows"].values()] == [
        None, None, None]  # two variants and no default: which one would be a guess


def test_a_mixed_thread_count_is_never_saved_and_a_null_seed_spread_falls_back(tmp_path):
    from noprop_bench.errors import UsageError
    from noprop_bench.report.baseline import accuracy_allowance, save_baseline

    records = [{**_ct_record(seed, 1e-3, 97.0), "environment": {"device": "cpu", "threads": threads}}
               for seed, threads in ((0, 1), (1, 2))]
    with pytest.raises(UsageError, match="the trials ran with 1 and 2 torch threads"):
        save_baseline(records, tmp_path / "b.json", "noprop-bench ...")  # no run could ever match it
    assert accuracy_allowance({"accuracy_se": 0.5, "accuracy_seed_se": None}, {"accuracy_standard_errors": 3.0,
                                                                              "accuracy_floor_points": 1.0}) == 1.5


def test_a_saved_baseline_rounds_its_figures(tmp_path):
    from noprop_bench.report.baseline import save_baseline

    records = [_ct_record(seed, 1e-3, accuracy, 1000.0 / 3) for seed, accuracy in ((0, 97.0), (1, 96.99999999999999))]
    row = save_baseline(records, tmp_path / "b.json", "noprop-bench ...")["rows"]["mnist5k / NoProp-CT (one-hot)"]
    assert row["accuracy_mean"] == 97.0 and row["samples_per_second"] == 333.333
    assert json.loads((tmp_path / "b.json").read_text())["rows"]["mnist5k / NoProp-CT (one-hot)"] == row


def test_a_regression_found_keeps_exit_3_when_the_save_is_then_refused(tmp_path, monkeypatch, capsys):
    from noprop_bench import cli
    from noprop_bench.errors import UsageError

    def refused(*args, **kwargs):
        raise UsageError("--save-baseline: every trial must finish ok")

    args = types.SimpleNamespace(baseline="b.json", save_baseline=str(tmp_path / "new.json"))
    monkeypatch.setattr(cli, "compare", lambda records, baseline: pd.DataFrame(
        [{"row": "tiny / Linear", "verdict": "accuracy fell 5.00 points (allowed 1.00)"}]))
    monkeypatch.setattr(cli, "save_baseline", refused)
    store = types.SimpleNamespace(read=lambda: ([], []), directory=tmp_path)
    said = []
    assert cli._check_baseline(args, {}, store, [], "", said.append) == cli.EXIT_REGRESSION
    assert any("regression against b.json" in line for line in said)
    assert said[-1] == "noprop-bench: error: --save-baseline: every trial must finish ok"


def test_records_without_a_thread_count_do_not_make_a_run_mixed():
    from noprop_bench.report.baseline import record_settings

    old, new = _ct_record(0, 1e-3, 97.0), {**_ct_record(1, 1e-3, 97.0), "environment": {"threads": 1}}
    assert record_settings([old, new])["threads"] == 1
    assert record_settings([{**new, "environment": {"threads": 10}}, new])["threads"] == [1, 10]


def test_a_baseline_row_prints_the_digits_table_1_prints():
    """Summed in another order, 14.13, 14.67, 9.77 and 13.65 average to 13.055 or to 13.055000000000001, which
    print as 13.05 and 13.06: the regression table and Table 1 must not disagree on one cell."""
    from noprop_bench.report.baseline import _mean_se_n
    from noprop_bench.report.records import format_mean_se

    for values in ([14.13, 14.67, 9.77, 13.65], [13.65, 9.77, 14.67, 14.13]):
        assert f"{_mean_se_n(values)[0]:.2f}" == format_mean_se(values).split(" ")[0]
