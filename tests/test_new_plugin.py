"""``noprop-bench new-plugin``: the distribution it writes installs, passes its own test, is listed and runs."""

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from noprop_bench.cli import main, run
from noprop_bench.scaffold import render_plugin


DISTRIBUTION = "noprop-bench-scaffolded-method"


def _python(*args, cwd, site=None):
    # the user's view: only the installed distribution, not this checkout's tests folder, on the path
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    if site is not None:
        env["PYTHONPATH"] = str(site)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.fixture
def installed_method_plugin(tmp_path, monkeypatch):
    """The generated method distribution, pip-installed into a private directory that this test (and the
    processes it starts) put on the path: tests running beside it under ``pytest -n`` load every plugin
    installed in the environment, and must not find this one there, half-installed or unimportable."""
    pytest.importorskip("setuptools")
    if importlib.util.find_spec("setuptools.command.bdist_wheel") is None:
        pytest.importorskip("wheel", reason="building a wheel needs the wheel package with setuptools < 70.1")
    directory = tmp_path / "np-scaffolded"
    with pytest.raises(SystemExit) as exit_info:
        main(["new-plugin", "scaffolded_method", "--dir", str(directory)])
    assert exit_info.value.code == 0
    site = tmp_path / "site"
    install = _python("-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(site),
                      str(directory), cwd=tmp_path)
    assert install.returncode == 0, install.stderr
    monkeypatch.syspath_prepend(str(site))  # entry points are read from the path, as from an environment's
    importlib.invalidate_caches()
    return directory, site


def test_a_new_method_plugin_installs_passes_its_test_is_listed_and_runs(installed_method_plugin, tmp_path,
                                                                        one_thread, capsys):
    directory, site = installed_method_plugin
    assert importlib.metadata.distribution(DISTRIBUTION).locate_file("").resolve() == site.resolve()
    tested = _python("-m", "pytest", "-q", "-p", "no:cacheprovider", str(directory), cwd=tmp_path, site=site)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "1 passed" in tested.stdout

    assert run(["--list"]) == 0
    methods = capsys.readouterr().out.split("Datasets:")[0]
    assert "scaffolded_method" in methods and "from plugin scaffolded_method" in methods

    out = tmp_path / "run"
    assert run(["--methods", "scaffolded_method,backprop", "--dataset", "mnist5k", "--budget", "2000samples",
                "--checkpoints", "0", "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert {r["method"]: (r["status"], r["samples"]) for r in records} == {
        "scaffolded_method": ("ok", 2048), "backprop": ("ok", 2048)}
    assert records[0]["code"]["distribution"] == "noprop-bench-scaffolded-method"


def test_a_new_dataset_plugin_passes_the_dataset_check(tmp_path, monkeypatch):
    from noprop_bench.testing import check_dataset

    written = render_plugin("scaffolded_data", tmp_path / "dist", kind="dataset")
    assert sorted(p.relative_to(tmp_path / "dist").as_posix() for p in written) == [
        "README.md", "pyproject.toml", "scaffolded_data/__init__.py", "tests/test_scaffolded_data.py"]
    assert 'scaffolded_data = "scaffolded_data"' in (tmp_path / "dist" / "pyproject.toml").read_text()
    assert "check_dataset(ScaffoldedData)" in (tmp_path / "dist" / "tests" / "test_scaffolded_data.py").read_text()
    monkeypatch.syspath_prepend(str(tmp_path / "dist"))
    from scaffolded_data import ScaffoldedData

    check_dataset(ScaffoldedData)


def test_a_new_executor_plugin_passes_the_executor_check_and_runs_a_grid(tmp_path, monkeypatch, one_thread,
                                                                        capsys):
    """The template runs each trial in a process of its own (``python -m PACKAGE``), so that process must find
    the package too: it is put on PYTHONPATH, as an installed distribution would be found."""
    from noprop_bench.testing import check_executor

    written = render_plugin("scaffolded_exec", tmp_path / "dist", kind="executor")
    assert sorted(p.relative_to(tmp_path / "dist").as_posix() for p in written) == [
        "README.md", "pyproject.toml", "scaffolded_exec/__init__.py", "scaffolded_exec/__main__.py",
        "tests/test_scaffolded_exec.py"]
    assert "check_executor(ScaffoldedExec)" in (tmp_path / "dist" / "tests" / "test_scaffolded_exec.py").read_text()
    for path in written:  # the test file too, which this test does not run
        if path.suffix == ".py":
            compile(path.read_text(), str(path), "exec")
    monkeypatch.syspath_prepend(str(tmp_path / "dist"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "dist"), *sys.path]))
    from scaffolded_exec import ScaffoldedExec

    check_executor(ScaffoldedExec)
    _ctrl_c_delivers_every_job_once(ScaffoldedExec, tmp_path / "stopped")
    _a_job_that_cannot_launch_fails_alone(ScaffoldedExec, tmp_path / "unlaunched")

    out = tmp_path / "run"
    # the plugin is found through --plugin here (not installed); a worker process loads it the same way
    common = ["--plugin", "scaffolded_exec", "--methods", "backprop", "--dataset", "mnist5k", "--budget",
              "128samples", "--checkpoints", "0", "--device", "cpu", "--out", str(out)]
    assert run([*common, "--seeds", "2", "--executor", "scaffolded_exec[workers=2]"]) == 0
    records = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert [(r["seed"], r["status"], r["executor"]) for r in sorted(records, key=lambda r: r["seed"])] == [
        (0, "ok", "scaffolded_exec[workers=2]"), (1, "ok", "scaffolded_exec[workers=2]")]
    assert len({r["worker"]["pid"] for r in records}) == 2  # each trial in a process of its own
    assert not list(out.glob(".scaffolded_exec-*"))  # its job and record files are cleaned up
    logs = sorted(path.stem for path in (out / "scaffolded_exec-logs").iterdir())
    assert logs == sorted(r["trial_id"] for r in records)  # each trial's output, kept


def _ctrl_c_delivers_every_job_once(executor_class, out_dir):
    """Ctrl-C just after the second of three trials started: both running trials are asked to stop and
    the third never starts; every job is delivered once, and the interrupt goes on to the host."""
    from noprop_bench.testing.executors import conformance_jobs

    executor = executor_class(executor_class.name, workers=2)
    executor.out_dir = str(out_dir)
    out_dir.mkdir()
    jobs = conformance_jobs(seeds=3, executor=executor.spec_text, out_dir=executor.out_dir)
    delivered = []

    def say(message):
        if message.startswith(f"{executor_class.name}: started") and " seed 1 " in message:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        executor.run(jobs, lambda job, record: delivered.append((job.trial_id, record["trial_id"], record["status"])),
                     say)
    assert sorted(trial for trial, _, _ in delivered) == sorted(job.trial_id for job in jobs)
    assert all(trial == record_trial for trial, record_trial, _ in delivered)
    statuses = dict((trial, status) for trial, _, status in delivered)
    assert statuses[jobs[2].trial_id] == "interrupted"
    assert {statuses[jobs[0].trial_id], statuses[jobs[1].trial_id]} <= {"ok", "interrupted"}
    assert not list(out_dir.glob(".scaffolded_exec-*"))


def _a_job_that_cannot_launch_fails_alone(executor_class, out_dir):
    from noprop_bench.testing.executors import conformance_jobs

    class CannotLaunch(executor_class):
        def launch(self, job, folder, slot):
            raise PermissionError("the queue refused the job")

    executor = CannotLaunch(executor_class.name, workers=1)
    executor.out_dir = str(out_dir)
    out_dir.mkdir()
    jobs = conformance_jobs(seeds=2, executor=executor.spec_text, out_dir=executor.out_dir)
    delivered = []
    executor.run(jobs, lambda job, record: delivered.append((job.trial_id, record["status"], record["error"])),
                 lambda message: None)
    assert [trial for trial, _, _ in delivered] == [job.trial_id for job in jobs]
    assert {(status, error) for _, status, error in delivered} == {
        ("failed", "scaffolded_exec could not launch it: the queue refused the job")}

    class DiesAtOnce(executor_class):  # a job whose process ends without a record, saying why in its log
        def launch(self, job, folder, slot):
            with open(self.log_file(job), "ab") as log:
                return subprocess.Popen([sys.executable, "-c", "print('CUDA error: out of memory'); exit(3)"],
                                        stdout=log, stderr=subprocess.STDOUT)

    executor = DiesAtOnce(executor_class.name, workers=2)
    executor.out_dir = str(out_dir)
    delivered.clear()
    executor.run(jobs, lambda job, record: delivered.append((job.trial_id, record["status"], record["error"],
                                                             record["worker"]["pid"])), lambda message: None)
    assert sorted(trial for trial, *_ in delivered) == sorted(job.trial_id for job in jobs)
    for trial, status, error, pid in delivered:
        assert status == "failed" and pid
        assert error == (f"the trial's process ended without a record (exit status 3); the end of "
                         f"{out_dir.resolve()}/scaffolded_exec-logs/{trial}.log: CUDA error: out of memory")


@pytest.mark.parametrize("args,message", [
    (["new-plugin", "My-Method"], "use lower case letters, digits and underscores"),
    (["new-plugin", "class"], "a Python keyword cannot name a package"),
    (["new-plugin", "json"], "a Python module of that name already exists"),
    (["new-plugin", "backprop"], "plugin 'backprop' already provides a method of that name"),
    (["new-plugin", "mnist5k", "--kind", "dataset"], "plugin 'mnist5k' already provides a dataset of that name"),
    (["new-plugin", "local", "--kind", "executor"], "already provides an executor of that name"),
    (["new-plugin", "backprop", "--kind", "dataset"], "an installed plugin already has that name"),
    (["new-plugin", "fine_name", "--dir", "."], "exists and is not an empty folder"),
    (["new-plugin", "fine_name", "--dir", "something/sub"], "--dir something/sub: cannot write pyproject.toml there"),
])
def test_bad_names_and_folders_are_usage_errors(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "something").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("name, kind", [("m", "method"), ("a_rather_long_method_name", "method"),
                                        ("d", "dataset"), ("a_rather_long_dataset_name", "dataset")])
def test_the_templates_comments_stay_lined_up_whatever_the_names_length(name, kind, tmp_path):
    """The class attributes' comments, one column in the template, stay one column once the names are in."""
    written = render_plugin(name, tmp_path, kind=kind)
    source = next(path for path in written if path.name == "__init__.py").read_text()
    start = source.index('    name = "')
    block = source[start:].split("\n\n", 1)[0].split("\n")
    trailing = [line for line in block if "  # " in line and not line.startswith("    # ")]  # not a comment alone
    columns = {line.index("  # ") + 2 for line in trailing}
    assert len(columns) == 1, block
    assert max(len(line[:line.index("  # ")].rstrip()) for line in trailing) + 2 == columns.pop()
