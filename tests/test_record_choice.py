"""Which record stands for a trial in the tables: finished results are never hidden by a later attempt that
failed or was interrupted, a trial retrained later wins over its older copy, and cells count their seeds
per split."""

from noprop_bench.report.table1 import render_table1
from noprop_bench.run.resume import finished_records
from noprop_bench.run.store import latest_per_trial


def _record(trial_id, seed=0, status="ok", test=(95.0,), train=None, finished_at="2026-01-01T00:00:00", **extra):
    record = {"trial_id": trial_id, "status": status, "method": "noprop_ct", "method_label": "NoProp-CT",
              "family": "continuous-time", "row_label": "NoProp-CT (one-hot)", "params": {"embedding": "one-hot"},
              "dataset": "mnist5k", "dataset_label": "MNIST5k", "seed": seed, "budget": "60s",
              "budget_unit": "seconds", "backbone": "noprop_cnn", "batch_size": 128, "inference_runs": len(test),
              "test_acc_runs": list(test) if status == "ok" else None, "train_acc_runs": list(train or []),
              "curve": [], "environment": {"device_name": "cpu"}, "finished_at": finished_at,
              "error": None if status == "ok" else "KeyboardInterrupt"}
    record.update(extra)
    return record


def _cell(table: str, row: str) -> list:
    line = next(line for line in table.splitlines() if line.startswith(f"| {row} "))
    return [cell.strip() for cell in line.split("|")[2:-1]]


def test_a_later_interrupted_or_failed_attempt_does_not_hide_a_finished_trial():
    ok = _record("a", test=(91.0,))
    for later in ("interrupted", "failed"):
        records = [ok, _record("a", status=later)]
        assert latest_per_trial(records) == [ok]
        assert finished_records(records)["a"] is ok  # resume counts the same trial as finished
        assert _cell(render_table1(records), "NoProp-CT (one-hot)") == ["91.00 (n=1)"]


def test_a_rerun_still_supersedes_what_it_reran():
    failed, rerun = _record("a", status="failed"), _record("a", test=(93.0,))
    assert latest_per_trial([failed, rerun]) == [rerun]
    older, retrained = _record("a", test=(90.0,)), _record("a", test=(96.0,), finished_at="2026-02-01T00:00:00")
    assert latest_per_trial([older, retrained]) == [retrained]
    diverged = _record("a", status="diverged")
    assert latest_per_trial([older, diverged]) == [diverged]  # both finished: the later one is the rerun's


def test_records_come_in_the_order_their_chosen_record_was_written():
    first_a, b, second_a = _record("a"), _record("b"), _record("a", test=(97.0,))
    assert latest_per_trial([first_a, b, second_a]) == [b, second_a]


def test_a_duplicate_seed_keeps_the_trial_written_last_and_the_caption_describes_it():
    """Two trials of one row and seed (here: one also measured train accuracy, which makes it another trial);
    the one retrained last is kept. (Other inference runs would make another row.)"""
    retrained_later = [_record("test-only", test=(80.0,) * 5, finished_at="2026-01-01"),
                       _record("with-train", test=(85.0,) * 5, train=(99.0,) * 5, finished_at="2026-01-02"),
                       _record("test-only", test=(95.0,) * 5, finished_at="2026-01-03")]
    table = render_table1(latest_per_trial(retrained_later))
    assert _cell(table, "NoProp-CT (one-hot)") == ["95.00 ± 0.00"]
    assert "1 seed(s) × 5 inference run(s) per seed" in table
    assert "more than one trial" in table and "only the last is used" in table


def test_a_train_cell_with_fewer_seeds_says_so():
    records = [_record("s0", seed=0, test=(90.0, 91.0), train=(99.0, 99.5)),
               _record("s1", seed=1, test=(92.0, 93.0))]  # seed 1 did not measure train accuracy
    table = render_table1(records, train_columns=True)
    train, test = _cell(table, "NoProp-CT (one-hot)")
    assert train.endswith("(1 of 2 seeds)") and "(1 of 2 seeds)" not in test
    assert '"(k of n seeds)" marks a cell' in table
    without_train = render_table1(records)
    assert "(k of n seeds)" not in without_train  # the train cell is not shown, so nothing is marked


def test_a_trial_that_never_reported_is_listed_with_its_datasets_label():
    from noprop_bench.report.table1 import not_ok_lines

    finished = _record("a")
    never_reported = _record("b", seed=1, status="interrupted")
    del never_reported["dataset_label"]  # written by the host from the trial's header: no dataset label
    assert not_ok_lines([finished, never_reported]) == [
        "NoProp-CT (one-hot) seed 1 on MNIST5k: interrupted (KeyboardInterrupt)"]
    assert not_ok_lines([never_reported]) == ["NoProp-CT (one-hot) seed 1 on mnist5k: interrupted (KeyboardInterrupt)"]


def test_a_finished_trial_in_one_directory_is_not_hidden_by_an_interrupted_copy_in_another(tmp_path):
    import json

    from noprop_bench.report.records import load_records

    for name, record in (("first", _record("a", test=(91.0,))), ("second", _record("a", status="interrupted"))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "trials.jsonl").write_text(json.dumps(record) + "\n")
    records, notes = load_records([tmp_path / "first", tmp_path / "second"])
    assert [r["status"] for r in records] == ["ok"]
    assert any("finished there; that copy is used" in note for note in notes)
