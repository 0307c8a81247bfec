"""The results store survives torn writes and lines that are not records."""

import json
import os

import pytest

from noprop_bench.run import store as store_module
from noprop_bench.run.store import TrialStore, write_fully


def test_a_torn_last_line_does_not_eat_the_next_record(tmp_path):
    store = TrialStore(tmp_path)
    store.append({"trial_id": "a", "status": "ok"})
    with open(store.path, "a") as handle:
        handle.write('{"trial_id": "b", "sta')  # a run killed mid-write
    store.append({"trial_id": "c", "status": "ok"})
    records, skipped = store.read()
    assert [r["trial_id"] for r in records] == ["a", "c"]
    assert len(skipped) == 1 and ":2: not valid JSON" in skipped[0]
    assert store.finished_ids() == {"a", "c"}


def test_a_line_that_is_json_but_not_an_object_is_skipped_with_a_note(tmp_path):
    store = TrialStore(tmp_path)
    store.path.write_text('[1, 2]\n"text"\n{"trial_id": "a", "status": "ok"}\n')
    records, skipped = store.read()
    assert records == [{"trial_id": "a", "status": "ok"}]
    assert [note.split(": ", 1)[1] for note in skipped] == ["a JSON list, not a record (an object)",
                                                           "a JSON str, not a record (an object)"]
    assert store.finished_ids() == {"a"}


def test_short_writes_are_continued(tmp_path, monkeypatch):
    real_write = os.write
    calls = []

    def three_bytes_at_a_time(fd, data):
        calls.append(len(data))
        return real_write(fd, bytes(data[:3]))

    monkeypatch.setattr(store_module.os, "write", three_bytes_at_a_time)
    TrialStore(tmp_path).append({"trial_id": "a"})
    assert json.loads((tmp_path / "trials.jsonl").read_text()) == {"trial_id": "a"}
    assert len(calls) > 3


def test_a_write_that_makes_no_progress_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module.os, "write", lambda fd, data: 0)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError, match="0 of 3 bytes written"):
            write_fully(fd, b"abc")
    finally:
        os.close(fd)
