"""The runner: the clock's fairness, resume, interruption, repeated inference, the table."""

import json
import re
import time

import fake_plugins
from noprop_bench.report.cli import report_main as main_report


def _records(out):
    return [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]


def test_clock_excludes_evaluation(fake_run):
    # each training step takes ~10 ms; each evaluation batch sleeps 0.3 s, 4 checkpoints + final
    code, out = fake_run("--methods", "sleepy", "--budget", "1.0", "--seeds", "1", "--checkpoints", "4")
    assert code == 0
    record = _records(out)[0]
    assert 1.0 <= record["train_seconds"] < 1.5
    assert record["eval_seconds"] >= 5 * 0.3
    # had evaluation been charged to training, at most ~(1.0 - 1.5) / 0.01 < 0 steps would fit
    assert record["steps"] >= 50
    assert len(record["curve"]) == 5


def test_an_evaluation_stopped_halfway_still_counts_as_evaluation_time(fake_run, monkeypatch):
    predict = fake_plugins.Sleepy.predict

    def stopped_in_the_final_evaluation(self, x):
        logits = predict(self, x)  # sleeps predict_sleep
        if len(x) == 64:  # the whole test split in one batch; the warm-up's probe has a training batch's 32
            raise KeyboardInterrupt
        return logits

    monkeypatch.setattr(fake_plugins.Sleepy, "predict", stopped_in_the_final_evaluation)
    code, out = fake_run("--methods", "sleepy[predict_sleep=0.3]", "--budget", "2steps", "--batch-size", "32",
                         "--checkpoints", "0")
    record = _records(out)[0]
    assert code == 130 and record["status"] == "interrupted" and record["steps"] == 2
    assert record["eval_seconds"] >= 0.3


def test_sample_budget_is_deterministic_and_reruns_skip(fake_run, tmp_path, capsys):
    args = ("--methods", "linear", "--budget", "640samples", "--seeds", "2")
    code, out = fake_run(*args)
    assert code == 0
    first = _records(out)
    assert [r["status"] for r in first] == ["ok", "ok"]
    assert all(r["samples"] == 640 and r["steps"] == 5 for r in first)
    assert len(fake_plugins.FINISHED) == 2  # the observer hook saw both trials

    code, again = fake_run(*args, out=tmp_path / "other")
    assert [r["test_acc"] for r in _records(again)] == [r["test_acc"] for r in first]

    capsys.readouterr()
    code, out = fake_run(*args)
    assert code == 0
    assert len(_records(out)) == 2  # nothing rerun
    assert capsys.readouterr().err.count("skip Linear (one-hot) seed") == 2


def test_interrupt_keeps_finished_trials_and_writes_the_table(fake_run, capsys):
    code, out = fake_run("--methods", "interrupt", "--budget", "3steps", "--seeds", "3")
    assert code == 130
    statuses = {r["seed"]: r["status"] for r in _records(out)}
    assert statuses == {0: "ok", 1: "interrupted"}
    table = (out / "table1.md").read_text()
    assert "Interrupt (one-hot)" in table
    not_in_table = table.split("Not in the table:")[1].split("Notes on the records")[0]  # with the trials that did not finish
    assert "Interrupt (one-hot) seed 2 on Tiny: not run (the run was interrupted before it began)" in not_in_table
    assert "1 planned trial(s) did not begin" in capsys.readouterr().err
    # a report written later names it too (from the plan the run left), though no record holds it
    assert main_report([str(out), "--format", "md,json,html"]) == 0
    line = "Interrupt (one-hot) seed 2 on Tiny: no record (the run ended before this trial began, or was killed"
    assert line in (out / "table1.md").read_text() and line in (out / "report.html").read_text()
    assert any(text.startswith(line) for text in json.loads((out / "report.json").read_text())["not_ok"])
    # resuming reruns only the interrupted trial, saying so, (which interrupts again here)
    code, out = fake_run("--methods", "interrupt", "--budget", "3steps", "--seeds", "3")
    assert [r["seed"] for r in _records(out)] == [0, 1, 1]
    assert "retry Interrupt (one-hot) seed 1: interrupted last time" in capsys.readouterr().err


def test_a_report_of_a_run_folder_keeps_the_runs_targets(fake_run, tmp_path):
    code, out = fake_run("--methods", "linear", "--budget", "3steps", "--checkpoints", "2", "--targets", "62,31")
    assert code == 0
    written = (out / "time_to_accuracy.md").read_text()
    assert re.search(r"≥ 62%\s*\|\s*≥ 31%", written), written  # the columns in the order given
    assert main_report([str(out)]) == 0
    assert (out / "time_to_accuracy.md").read_text() == written  # rewritten in place, alike
    _, again = fake_run("--methods", "linear", "--budget", "3steps", "--checkpoints", "2", "--targets", "31, 62",
                        out=tmp_path / "again")
    assert main_report([str(out), str(again), "--out", str(tmp_path / "both")]) == 0  # the same targets
    assert "≥ 62%" in (tmp_path / "both" / "time_to_accuracy.md").read_text()
    assert main_report([str(out), "--targets", "44", "--out", str(tmp_path / "other")]) == 0
    given = (tmp_path / "other" / "time_to_accuracy.md").read_text()
    assert "≥ 44%" in given and "≥ 62%" not in given


def test_stochastic_methods_are_evaluated_inference_runs_times(fake_run):
    code, out = fake_run("--methods", "noisy,linear", "--budget", "3steps", "--seeds", "1",
                         "--inference-runs", "4", "--train-accuracy")
    records = {r["method"]: r for r in _records(out)}
    assert len(records["noisy"]["test_acc_runs"]) == 4
    assert len(set(records["noisy"]["test_acc_runs"])) > 1  # the runs really are different draws
    assert len(records["linear"]["test_acc_runs"]) == 1
    assert len(records["noisy"]["train_acc_runs"]) == 4


def test_a_long_final_evaluation_reports_each_inference_run(fake_run, monkeypatch, capsys):
    from noprop_bench.run import runner

    code, out = fake_run("--methods", "noisy", "--budget", "3steps", "--inference-runs", "3", "--train-accuracy")
    assert code == 0 and "final evaluation, " not in capsys.readouterr().err  # a quick one stays quiet
    monkeypatch.setattr(runner, "FINAL_PROGRESS_AFTER_SECONDS", 0.0)  # as if every run took long
    code, out = fake_run("--methods", "noisy", "--budget", "3steps", "--inference-runs", "3", "--train-accuracy",
                         out=out.parent / "slow")
    lines = [line for line in capsys.readouterr().err.splitlines() if "final evaluation, " in line]
    record = _records(out)[0]
    assert [line.split("final evaluation, ")[1].split(" (")[0] for line in lines] == (
        [f"test inference run {n}/3: {accuracy:.2f}%" for n, accuracy in enumerate(record["test_acc_runs"], 1)]
        + [f"train inference run {n}/3: {accuracy:.2f}%" for n, accuracy in enumerate(record["train_acc_runs"], 1)])


def test_one_long_inference_run_says_how_far_it_is_batch_by_batch(fake_run, monkeypatch, capsys):
    from noprop_bench.run import evaluation_plan, runner

    monkeypatch.setattr(runner, "HEARTBEAT_SECONDS", 0.0)  # every batch is "a while" after the last line
    monkeypatch.setattr(runner, "FINAL_PROGRESS_AFTER_SECONDS", float("inf"))  # no per-run lines, however slow
    monkeypatch.setattr(evaluation_plan, "CPU_EVAL_BATCH", 16)  # the 64 test images in 4 batches
    code, out = fake_run("--methods", "noisy", "--budget", "3steps", "--inference-runs", "1", "--train-accuracy")
    assert code == 0
    lines = [line.split("final evaluation, ")[1].split(" (")[0] for line in capsys.readouterr().err.splitlines()
             if "final evaluation, " in line]
    train_images = _records(out)[0]["train_acc_size"]
    assert lines == ([f"test inference run 1/1: {n}/64 images" for n in (16, 32, 48)]
                     + [f"train inference run 1/1: {n}/{train_images} images" for n in range(16, train_images, 16)])


def test_one_batch_longer_than_the_heartbeat_still_says_how_far_its_pass_is(fake_run, monkeypatch, capsys):
    """On the CPU one evaluation batch may hold the whole test split (1,000 images): a pass that is a single
    slow batch said nothing until it ended, however long it ran."""
    from noprop_bench.run import runner, ticker

    monkeypatch.setattr(runner, "HEARTBEAT_SECONDS", 0.2)
    monkeypatch.setattr(runner, "FINAL_PROGRESS_AFTER_SECONDS", float("inf"))  # no per-run lines
    monkeypatch.setattr(ticker, "TICK_SECONDS", 0.05)
    code, _ = fake_run("--methods", "steady[predict_sleep=1.0,step_sleep=0]", "--budget", "2steps",
                       "--checkpoints", "0")  # its 64 test images in one batch, which sleeps 1 s
    assert code == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "final evaluation, " in line]
    assert 2 <= len(lines) <= 6  # about one per 0.2 s of the 1-s batch: the pass is no longer silent
    assert all("final evaluation, test inference run 1/1: 0/64 images (" in line for line in lines)


def test_checkpoints_that_fell_within_one_step_are_noted(fake_run, capsys):
    code, out = fake_run("--methods", "linear", "--budget", "3steps", "--checkpoints", "8")
    record = _records(out)[0]
    assert len(record["curve"]) == 3  # two checkpoints (the first step crossed 5 checkpoint times) and the end
    note = "2 of 8 checkpoints were evaluated: several checkpoint times fell within one step"
    assert note in record["warnings"][0] and note in capsys.readouterr().err
    code, out = fake_run("--methods", "linear", "--budget", "400steps", "--checkpoints", "3", out=out.parent / "all")
    assert "warnings" not in _records(out)[0]


def test_record_holds_what_the_paper_needs(fake_run):
    code, out = fake_run("--methods", "linear", "--budget", "4steps", "--seeds", "1", "--val-split", "0.25")
    record = _records(out)[0]
    for key in ("steps", "samples", "epochs", "train_seconds", "eval_seconds", "params_total",
                "peak_memory_bytes", "memory_kind", "command", "backbone", "budget", "seed", "trial_id"):
        assert record[key] is not None, key
    assert record["environment"]["torch"] and record["environment"]["device_name"]
    assert record["params_total"] == 16 * 16 * 4 + 4
    assert record["memory_kind"] == "cpu_peak_rss" and record["peak_memory_bytes"] > 10 * 2**20
    assert record["train_size"] == 192 and "val_acc" in record
    assert record["command"].startswith("noprop-bench --plugin fake_plugins")


def test_table1_format(fake_run):
    code, out = fake_run("--methods", "linear,noisy", "--budget", "3steps", "--seeds", "2", "--inference-runs", "3")
    lines = (out / "table1.md").read_text().splitlines()
    assert lines[2].startswith("| Method") and "Tiny test" in lines[2]
    body = "\n".join(lines)
    assert body.index("**Discrete-time**") < body.index("Linear (one-hot)") < body.index("**Continuous-time**")
    assert body.index("**Continuous-time**") < body.index("Noisy (one-hot)")
    row = next(line for line in lines if line.startswith("| Linear (one-hot)"))
    assert " ± " in row
    assert "2 seed(s) × 1 or 3 inference run(s)" in body and "Budget 3steps" in body


def test_a_failing_observer_does_not_stop_the_run(fake_run, capsys):
    code, out = fake_run("--methods", "linear[lr=0.123]", "--budget", "2steps", "--seeds", "2")
    assert code == 0
    assert len(_records(out)) == 2
    assert "warning: a trial_finished observer failed: RuntimeError: observer broke" in capsys.readouterr().err


def test_final_evaluations_share_one_backbone_pass_with_the_same_results(fake_run, tmp_path, monkeypatch):
    from noprop_bench.method import Method
    from noprop_bench_plugins.methods.noprop_fm import NoPropFM

    calls = []
    features = NoPropFM.features
    monkeypatch.setattr(NoPropFM, "features", lambda self, x: calls.append(len(x)) or features(self, x))
    args = ("--methods", "noprop_fm", "--budget", "256samples", "--checkpoints", "0", "--inference-runs", "3",
            "--inference-sweep")
    assert fake_run(*args)[0] == 0
    # passes over the 64 test images (the warm-up's inference probe sees a few training images)
    shared, shared_calls = _records(tmp_path / "out")[0], calls.count(64)
    calls.clear()
    monkeypatch.setattr(Method, "reuses_features", lambda self: False)
    assert fake_run(*args, out=tmp_path / "whole")[0] == 0
    whole, whole_calls = _records(tmp_path / "whole")[0], calls.count(64)

    for field in ("test_acc_runs", "inference_sweep", "diagnostics"):
        if field == "inference_sweep":
            strip = lambda points: [(p["setting"], p["test_acc_runs"]) for p in points]  # noqa: E731
            assert strip(shared[field]) == strip(whole[field])
        else:
            assert shared[field] == whole[field]
    sweep_points = len(shared["inference_sweep"])
    assert sweep_points >= 4 and set(shared["diagnostics"]) == {"z_ablation"}
    assert shared_calls == 1  # the 64 test images are one evaluation batch
    assert whole_calls == 3 + 3 * sweep_points + 1  # every run, sweep run and diagnostic recomputed them


def test_long_stretches_without_checkpoints_still_print_progress(fake_run, capsys, monkeypatch):
    from noprop_bench.run import runner

    monkeypatch.setattr(runner, "HEARTBEAT_SECONDS", 0.0)  # every clock read is "long enough"
    code, _ = fake_run("--methods", "linear", "--budget", "5steps", "--checkpoints", "0")
    err = capsys.readouterr().err
    assert code == 0
    assert err.count("steps) training") == 4  # after steps 1 to 4; the fifth ends the budget
    assert "training done (5 steps); final evaluation on 64 test images ..." in err


def test_cpu_peak_memory_leaves_out_what_runs_while_paused():
    """Checkpoint evaluations pause the trial's memory measure: on the CPU its sampler skips them too, so a
    plugin predicting in large batches does not inflate the training's peak resident set."""
    import numpy as np

    from noprop_bench.run.memory import PeakMemory, current_rss_bytes

    size = 300 * 2 ** 20
    with PeakMemory("cpu", interval=0.005) as memory:
        before = current_rss_bytes()
        memory.pause()
        held = np.ones(size, dtype=np.uint8)  # written, so resident
        time.sleep(0.1)  # many sampling intervals
        grown = current_rss_bytes() - before
        del held
        memory.resume()
        time.sleep(0.05)
    assert grown > size // 2  # the allocation was resident while paused
    assert memory.peak_bytes - before < size // 4
    with PeakMemory("cpu", interval=0.005) as counted:  # unpaused, the same allocation counts
        before = current_rss_bytes()
        held = np.ones(size, dtype=np.uint8)
        time.sleep(0.1)
        del held
    assert counted.peak_bytes - before > size // 2


def test_a_rerun_with_every_trial_finished_starts_no_executor(fake_run, monkeypatch):
    """Nothing to train: an executor (a Ray cluster, a SLURM submission) must not even start."""
    from noprop_bench_plugins.executors.local import LocalExecutor

    args = ("--methods", "linear", "--budget", "64samples", "--checkpoints", "0")
    assert fake_run(*args)[0] == 0
    started = []
    monkeypatch.setattr(LocalExecutor, "run", lambda self, jobs, *_: started.append(jobs))
    code, out = fake_run(*args)
    assert code == 0 and len(_records(out)) == 1 and started == []
    assert json.loads((out / "plan.json").read_text())["trials"][0]["trial"] == "Linear (one-hot) seed 0"
