"""Trial records know the code that produced them; a rerun retrains what other code finished."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import noprop_bench
import noprop_bench_plugins
from noprop_bench.provenance import (code_identity, describe_code, distribution_packages, distribution_sha256,
                                     git_commit, git_modified, same_code, source_files, source_sha256)
from noprop_bench_plugins.methods.backprop import Backprop


def _records(out):
    return [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]


def _rewrite(out, change):
    records = _records(out)
    for record in records:
        change(record)
    (out / "trials.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_the_code_of_a_built_in_method_is_its_distribution_version_and_checkout_commit():
    code = code_identity(Backprop)
    assert code["distribution"] == "noprop-bench" and code["version"] == "0.1.0"
    source = Path(noprop_bench_plugins.__file__).parent
    head = shutil.which("git") and subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"],
                                                  capture_output=True, text=True)
    if head and head.returncode == 0 and "site-packages" not in source.parts:  # an editable install of a checkout
        assert code["git_commit"] == head.stdout.strip()
        assert re.fullmatch(r"noprop-bench 0\.1\.0, git [0-9a-f]{12}( with uncommitted changes)?, source [0-9a-f]{12}",
                            describe_code(code))
        # the harness's files count as well as the plugins': both decide what a built-in method's trial computes
        harness = Path(noprop_bench.__file__).parent / "run" / "runner.py"
        assert harness in [path for _, path in source_files("noprop_bench")]
        assert code["source_sha256"] == distribution_sha256("noprop-bench", Backprop.__module__)
        assert distribution_packages("noprop-bench") == ["noprop_bench", "noprop_bench_plugins"]
    else:  # installed from a wheel: its version names it
        assert code["git_commit"] is None and code["source_sha256"] is None


def test_a_rerun_retrains_trials_finished_by_other_code_and_keeps_them_when_asked(fake_run, capsys):
    args = ("--methods", "linear", "--budget", "128samples", "--seeds", "2", "--checkpoints", "0")
    code, out = fake_run(*args)
    first = _records(out)
    assert code == 0 and len(first) == 2 and all(r["code"] == first[0]["code"] for r in first)

    def older_seed_0(record):
        if record["seed"] == 0:
            record["code"] = {**record["code"], "version": "0.0.9"}

    _rewrite(out, older_seed_0)
    capsys.readouterr()
    assert fake_run(*args, "--keep-stale")[0] == 0
    err = capsys.readouterr().err
    assert "keep Linear (one-hot) seed 0: finished with" in err and "0.0.9" in err and "--keep-stale" in err
    assert len(_records(out)) == 2  # nothing retrained
    table = (out / "table1.md").read_text()
    assert "Linear (one-hot) †" in table
    assert "† marks rows with trials that ran older code of their method" in table
    assert "Linear (one-hot) seed 0 (" in table and "0.0.9" in table

    assert fake_run(*args)[0] == 0
    err = capsys.readouterr().err
    assert "stale Linear (one-hot) seed 0: finished with" in err and "training it again" in err
    assert "skip Linear (one-hot) seed 1" in err
    records = _records(out)
    assert [r["seed"] for r in records] == [0, 1, 0]  # only the stale trial was trained again
    assert "†" not in (out / "table1.md").read_text()  # the latest record of each trial ran the current code


def test_keep_stale_marks_trials_of_other_code_even_when_every_trial_of_the_method_is_stale(fake_run, capsys):
    """The usual case after an upgrade: no trial of the method ran the current code, so the newest trial
    in the records is itself stale; the run compares with its own code."""
    args = ("--methods", "linear", "--budget", "128samples", "--seeds", "2", "--checkpoints", "0")
    code, out = fake_run(*args)
    assert code == 0
    _rewrite(out, lambda record: record.update(code={**record["code"], "version": "0.0.9"}))
    capsys.readouterr()
    assert fake_run(*args, "--keep-stale")[0] == 0
    assert len(_records(out)) == 2  # nothing retrained
    for name in ("table1.md", "table2.md"):  # Table 2's throughput is the older code's too
        table = (out / name).read_text()
        assert "Linear (one-hot) †" in table, name
        assert "than the code of this run" in table, name
        assert "Linear (one-hot) seed 0 (" in table and "Linear (one-hot) seed 1 (" in table, name

    report_out = out / "rerendered"
    from noprop_bench.report.cli import report_main
    assert report_main([str(out), "--out", str(report_out)]) == 0
    # re-rendered without a run, the trials are compared with each other: they all ran one code
    assert "†" not in (report_out / "table1.md").read_text()


def test_table_2_and_report_json_mark_the_trials_table_1_marks_when_devices_split_table_2(fake_run, tmp_path):
    """Under a sample budget Table 1 holds both devices in one table, Table 2 one table per device: a
    trial of older code alone on its device is still older than its method's newest trial in Table 1."""
    args = ("--methods", "linear", "--budget", "128samples", "--seeds", "2", "--checkpoints", "0")
    code, out = fake_run(*args)
    assert code == 0

    def seed_0_older_elsewhere(record):
        if record["seed"] == 0:
            record["code"] = {**record["code"], "version": "0.0.9"}
            record["environment"] = {**record["environment"], "device_name": "cpu (another machine)"}

    _rewrite(out, seed_0_older_elsewhere)
    from noprop_bench.report.cli import report_main
    report_out = tmp_path / "report"
    assert report_main([str(out), "--out", str(report_out), "--format", "md,json"]) == 0
    table1, table2 = (report_out / "table1.md").read_text(), (report_out / "table2.md").read_text()
    assert table1.count("Linear (one-hot) †") == 1 and table2.count("Linear (one-hot) †") == 1
    assert table2.count("| Linear (one-hot) ") == 2  # one row per device's table, the older code's marked
    assert "Linear (one-hot) seed 0 (" in table2 and "Linear (one-hot) seed 1 (" not in table2
    summary = json.loads((report_out / "report.json").read_text())
    marks = {table["device"]: [cell["older_code"] for cell in table["cells"]] for table in summary["table2"]}
    assert marks == {"cpu (another machine)": [True], summary["table2"][1]["device"]: [False]}
    assert [cell["older_code"] for cell in summary["table1"][0]["cells"]] == [True]


def test_a_duplicate_seed_dropped_from_table_1_still_sets_the_newest_code(fake_run, tmp_path):
    """The same seeds on two machines under a sample budget: Table 1 keeps one trial per seed, from the last
    directory given (here the older code's). The newest code is still the other machine's, so the kept
    trials are marked and the newer machine's Table 2 is not."""
    import shutil

    args = ("--methods", "linear", "--budget", "128samples", "--seeds", "2", "--checkpoints", "0")
    code, newer = fake_run(*args)
    assert code == 0
    older = tmp_path / "older"
    shutil.copytree(newer, older)

    def older_elsewhere(record):
        record["code"] = {**record["code"], "version": "0.0.9"}
        record["environment"] = {**record["environment"], "device_name": "cpu (another machine)"}
        record["finished_at"] = "2000-01-01T00:00:00+00:00"

    _rewrite(older, older_elsewhere)
    from noprop_bench.report.cli import report_main
    report_out = tmp_path / "report"
    assert report_main([str(newer), str(older), "--out", str(report_out), "--format", "md,json"]) == 0
    table1, table2 = (report_out / "table1.md").read_text(), (report_out / "table2.md").read_text()
    assert "Linear (one-hot) †" in table1 and "(0.0.9" in table1
    sections = table2.split("| Method")[1:]
    assert len(sections) == 2
    assert ["†" in section.split("\n\n")[0] for section in sections] == [False, True]  # newer machine's first
    summary = json.loads((report_out / "report.json").read_text())
    assert [[cell["older_code"] for cell in table["cells"]] for table in summary["table2"]] == [[False], [True]]
    assert [cell["older_code"] for cell in summary["table1"][0]["cells"]] == [True]


def test_records_without_code_identity_are_kept_and_render(fake_run, capsys):
    args = ("--methods", "linear", "--budget", "128samples", "--seeds", "1", "--checkpoints", "0")
    code, out = fake_run(*args)
    _rewrite(out, lambda record: record.pop("code"))
    capsys.readouterr()
    assert fake_run(*args)[0] == 0
    assert "1 finished trial(s) in" in capsys.readouterr().err
    assert len(_records(out)) == 1
    assert "Linear (one-hot)" in (out / "table1.md").read_text() and "†" not in (out / "table1.md").read_text()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to make a checkout")
def test_an_edit_to_a_checkouts_code_makes_it_other_code_and_a_commit_of_docs_does_not(tmp_path, monkeypatch):
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    package = tmp_path / "changed_plugin"
    package.mkdir()
    (package / "__init__.py").write_text("class Method:\n    pass\n")
    for command in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "plugin"]):
        subprocess.run(git + command, check=True, capture_output=True)
    monkeypatch.syspath_prepend(str(tmp_path))
    import changed_plugin

    def identity():  # as a new process finds it
        for cached in (git_commit, git_modified, source_sha256):
            cached.cache_clear()
        return code_identity(changed_plugin.Method)

    clean = identity()
    assert clean["git_commit"] and clean["git_modified"] is False and clean["source_sha256"]
    (package / "__init__.py").write_text("class Method:\n    changed = True\n")
    modified = identity()
    assert modified["git_commit"] == clean["git_commit"] and modified["git_modified"] is True
    assert "with uncommitted changes, source" in describe_code(modified)
    assert not same_code(clean, modified)  # the files changed: its trials are stale, committed or not
    subprocess.run(git + ["commit", "-q", "-am", "edit"], check=True, capture_output=True)
    committed = identity()
    assert committed["git_commit"] != clean["git_commit"] and same_code(modified, committed)
    (tmp_path / "README.md").write_text("notes\n")
    for command in (["add", "README.md"], ["commit", "-q", "-m", "docs"]):
        subprocess.run(git + command, check=True, capture_output=True)
    assert same_code(committed, identity())  # another commit, the same code: nothing to retrain


PLAIN_MODULE = '''
from noprop_bench import hookimpl
from fake_plugins import Linear


class Edited(Linear):
    name, label = "edited", "Edited"


@hookimpl
def register_methods(register):
    register(Edited)
'''


def test_a_plugin_module_in_a_plain_folder_is_named_by_its_source(fake_run, tmp_path, monkeypatch, capsys):
    """No version or commit names a module loaded with --plugin from a folder outside any checkout: a digest of
    its source does, so an edit to it retrains its trials instead of keeping the old results."""
    from noprop_bench.provenance import source_sha256

    folder = tmp_path / "plain"
    folder.mkdir()
    module = folder / "plain_plugin_for_identity.py"
    module.write_text(PLAIN_MODULE)
    monkeypatch.syspath_prepend(str(folder))
    args = ("--plugin", "plain_plugin_for_identity", "--methods", "edited", "--budget", "64samples",
            "--checkpoints", "0")
    assert fake_run(*args)[0] == 0
    import plain_plugin_for_identity

    code = code_identity(plain_plugin_for_identity.Edited)
    assert code["git_commit"] is None and code["version"] is None
    assert re.fullmatch(r"source [0-9a-f]{12}", describe_code(code))
    assert fake_run(*args)[0] == 0
    assert "skip Edited (one-hot) seed 0: already finished" in capsys.readouterr().err
    module.write_text(PLAIN_MODULE.replace("label = \"edited\", \"Edited\"", "label = 'edited', 'Edited'"))
    source_sha256.cache_clear()  # a new process reads the files afresh
    assert fake_run(*args)[0] == 0
    err = capsys.readouterr().err
    assert "stale Edited (one-hot) seed 0: finished with source" in err and "training it again" in err
    digest = source_sha256("plain_plugin_for_identity")
    (folder / "plain_helper_for_identity.py").write_text("WIDTH = 3\n")  # what the plugin may import beside it
    source_sha256.cache_clear()
    assert source_sha256("plain_plugin_for_identity") != digest


def test_records_of_a_checkout_from_before_its_digest_are_told_apart_by_their_commits():
    older = {"distribution": "noprop-bench", "version": "0.1.0", "git_commit": "a" * 40, "source_sha256": None}
    assert same_code(older, dict(older)) and not same_code(older, {**older, "git_commit": "b" * 40})
    digested = {**older, "source_sha256": "c" * 64}
    assert not same_code(older, digested) and not same_code(digested, older)  # retrained once
    assert same_code(digested, {**digested, "git_commit": "b" * 40})  # with a digest the commit decides nothing


def test_an_editable_install_outside_git_is_named_by_its_source(tmp_path, monkeypatch):
    """`pip install -e` of a plugin folder that is no git checkout (what new-plugin scaffolds): its version
    stays 0.1.0 through every edit, so its files must name it, or a rerun keeps results of the old code."""
    from noprop_bench import provenance

    package = tmp_path / "editable_plugin_for_identity"
    package.mkdir()
    (package / "__init__.py").write_text("class Method:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import editable_plugin_for_identity

    monkeypatch.setattr(provenance, "distribution_of", lambda cls: "editable-plugin")
    monkeypatch.setattr(provenance, "version", lambda name: "0.1.0")
    monkeypatch.setattr(provenance, "distribution_packages", lambda name: ["editable_plugin_for_identity"])

    def identity():  # as a new process finds it
        for cached in (git_commit, source_sha256, provenance.distribution_sha256):
            cached.cache_clear()
        return code_identity(editable_plugin_for_identity.Method)

    before = identity()
    assert before["version"] == "0.1.0" and before["git_commit"] is None and before["source_sha256"]
    (package / "__init__.py").write_text("class Method:\n    changed = True\n")
    assert not same_code(before, identity())


def test_stale_trials_an_interrupted_rerun_did_not_reach_are_not_called_missing(fake_run, capsys, tmp_path):
    """Their older results are still in the tables: the run says they were not retrained, and names nothing
    it skipped for the interruption (here --save-baseline) without saying so."""
    code, out = fake_run("--methods", "linear", "--budget", "3steps", "--seeds", "2", "--checkpoints", "0")
    assert code == 0
    _rewrite(out, lambda record: record.update(code={**record["code"], "version": "0.0.9"}))
    capsys.readouterr()
    baseline = tmp_path / "baseline.json"
    code, out = fake_run("--methods", "interrupt,linear", "--budget", "3steps", "--seeds", "2", "--checkpoints", "0",
                         "--save-baseline", str(baseline))
    assert code == 130 and not baseline.exists()
    err = capsys.readouterr().err
    assert "2 stale trial(s) were not trained again: the tables show their older results (marked †" in err
    assert f"--save-baseline {baseline}: not written, as the run was interrupted" in err
    table = (out / "table1.md").read_text()
    assert "Linear (one-hot) †" in table
    assert "Linear (one-hot) seed 0 on Tiny: not run" not in table
