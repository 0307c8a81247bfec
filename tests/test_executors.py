"""Executors: the same grid gives the same trials and accuracies whichever executor runs it, a dead worker
loses only its own trial, resume works across executors, and missing engines are explained."""

import dataclasses
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from noprop_bench.cli import EXIT_OK, EXIT_TRIAL_FAILED, EXIT_USAGE, main, run
from noprop_bench.executor import Progress, TrialJob, execute_job, failed_record
from noprop_bench.plugins import load_plugins
from noprop_bench.run.store import TrialStore, latest_per_trial
from noprop_bench.specs import parse_method_spec
from noprop_bench_plugins.executors import local as local_executor
from noprop_bench_plugins.executors.local import LocalExecutor
from noprop_bench_plugins.executors.ray import RayExecutor
from noprop_bench_plugins.executors.submitit import SubmititExecutor

HAVE_SUBMITIT = importlib.util.find_spec("submitit") is not None
HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_submitit = pytest.mark.skipif(not HAVE_SUBMITIT, reason="submitit is not installed (pip install '.[slurm]')")
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="no Ray wheel for this Python (pip install '.[ray]')")

# 2 methods x 2 seeds on the embedded MNIST sample, at a sample budget: deterministic on the CPU.
# One thread per trial everywhere, so every executor computes with the same reductions. NoProp-FM samples
# at inference (its runs must agree too); 5 Euler steps instead of 1000 keep its final evaluation short.
GRID = ["--methods", "backprop,noprop_fm[steps=5]", "--dataset", "mnist5k", "--budget", "2048samples",
        "--seeds", "2", "--checkpoints", "0", "--inference-runs", "2", "--threads", "1", "--device", "cpu"]
EXECUTORS = [
    pytest.param("local[workers=2]", id="local-workers"),
    pytest.param("submitit[cluster=local]", id="submitit", marks=needs_submitit),
    pytest.param("ray", id="ray", marks=needs_ray),
]


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _records(out):
    records, unreadable = TrialStore(out).read()
    assert unreadable == []  # no torn or interleaved lines
    return records


def _outcomes(records):
    return {r["trial_id"]: (r["status"], r["row_label"], r["seed"], r.get("test_acc_runs")) for r in records}


@pytest.fixture(scope="module")
def in_process_grid(tmp_path_factory):
    """The grid run by the default executor: in this process, one trial after another."""
    out = tmp_path_factory.mktemp("local") / "run"
    threads = torch.get_num_threads()
    try:
        assert run([*GRID, "--out", str(out)]) == EXIT_OK
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("executor", EXECUTORS)
def test_every_executor_gives_the_same_trials_and_accuracies(executor, in_process_grid, tmp_path, keep_threads):
    out = tmp_path / "run"
    assert run([*GRID, "--executor", executor, "--out", str(out)]) == EXIT_OK
    expected, got = _records(in_process_grid), _records(out)
    assert len(expected) == len(got) == 4
    assert _outcomes(got) == _outcomes(expected)  # same ids, statuses and every inference run's accuracy
    assert {r["status"] for r in got} == {"ok"}
    # accuracies differ between seeds, so agreeing on them is not agreeing on chance
    assert len({tuple(r["test_acc_runs"]) for r in got}) == 4
    for record in got:
        assert record["executor"] == executor
        assert record["worker"]["host"] and record["worker"]["pid"]
        assert record["environment"]["device_name"].startswith("cpu")
        assert record["environment"]["host"] == record["worker"]["host"]
    assert (out / "table1.md").read_text() == (in_process_grid / "table1.md").read_text()
    # submitit jobs and pool workers leave a copy of each record, dropped (with its folder) once the host has it
    assert not (out / "unmerged-records").exists()


@pytest.mark.slow
@pytest.mark.parametrize("executor", EXECUTORS)
def test_a_killed_worker_loses_only_its_trial_and_a_rerun_finishes_it(executor, tmp_path, keep_threads, capsys):
    """The first trial kills its worker early, with other trials still to come: they run (a pool of local
    workers starts a new worker: three trials to come there; a job or task per trial elsewhere, so one), and
    only the killed trial is lost; a rerun trains it alone."""
    marker = tmp_path / "died-once"
    seeds = 2 if executor.startswith("local") else 1
    command = ["--plugin", "executor_plugins", "--methods", f"doomed[marker={marker},die_at_seed=0],backprop",
               "--dataset", "mnist5k", "--budget", "640samples", "--seeds", str(seeds), "--checkpoints", "0",
               "--threads", "1", "--device", "cpu", "--executor", executor, "--out", str(tmp_path / "run")]
    assert run(command) == EXIT_TRIAL_FAILED
    assert marker.exists()  # the worker really was killed mid-training
    first = _records(tmp_path / "run")
    assert len(first) == 2 * seeds
    failed = [r for r in first if r["status"] != "ok"]
    assert [(r["method"], r["seed"], r["status"]) for r in failed] == [("doomed", 0, "failed")]
    assert failed[0]["error"]  # the cause, in the engine's words
    if executor.startswith("local"):
        assert "died while running this trial: killed by signal 9 (SIGKILL)" in failed[0]["error"]
        assert failed[0]["worker"]["host"] and failed[0]["worker"]["pid"]  # where it died
        # two workers at the start, and one in place of the killed one
        assert capsys.readouterr().err.count(" started (pid ") == 3
    if executor.startswith("submitit"):
        assert "ended without a result (killed, or crashed outside Python" in failed[0]["error"]
        assert "(FINISHED) returned" not in failed[0]["error"]  # not called finished while it was killed
        assert not (tmp_path / "run" / "submitit" / "%j").exists()  # submitit's literal folder template
    capsys.readouterr()

    assert run(command) == EXIT_OK
    err = capsys.readouterr().err
    assert (err.count("skip ") == 2 * seeds - 1
            and f"finished 1/1: Doomed [die_at_seed=0, marker={marker}] seed 0: ok" in err)
    second = _records(tmp_path / "run")
    assert len(second) == 2 * seeds + 1 and second[:2 * seeds] == first
    latest = latest_per_trial(second)
    assert len(latest) == 2 * seeds and {r["status"] for r in latest} == {"ok"}


def test_a_worker_has_the_hosts_environment_as_it_is_when_the_worker_starts(tmp_path, monkeypatch, keep_threads):
    """Workers fork from a server started with the first of them, yet each gets the host's environment at its
    own start (a data root changed since, say), as a freshly spawned process would."""
    for value in ("first", "second"):
        monkeypatch.setenv("NOPROP_ECHO", value)
        assert run(["--plugin", "executor_plugins", "--methods", "environment_echo", "--dataset", "mnist5k",
                    "--budget", "64samples", "--checkpoints", "0", "--threads", "1", "--device", "cpu",
                    "--executor", "local[workers=1]", "--out", str(tmp_path / value)]) == EXIT_TRIAL_FAILED
        [record] = _records(tmp_path / value)
        assert f"NOPROP_ECHO={value}" in record["error"]


@pytest.mark.skipif(local_executor._start_method("cpu") != "forkserver", reason="no fork server on this platform")
def test_workers_outlive_a_sigterm_that_reaches_their_fork_server(monkeypatch):
    """A SIGTERM to the whole process group reaches the fork server too. Were it to die of it, every worker
    would read as dead (exit code 255) while still training, and lose what it measured."""
    from multiprocessing import forkserver
    from multiprocessing.connection import wait

    import executor_plugins

    monkeypatch.setattr(local_executor, "_worker_main", executor_plugins.worker_that_answers_at_once)
    executor = LocalExecutor("local[workers=1]", workers=1)
    executor.device_type("cpu")
    if hasattr(forkserver._forkserver, "_stop"):  # Python 3.10 on: the worker below starts a server of its own
        forkserver._forkserver._stop()
    handling = signal.getsignal(signal.SIGTERM), signal.pthread_sigmask(signal.SIG_BLOCK, [])
    worker = local_executor._Pool(executor, 1, lambda message: None)._start(0)
    try:
        # the host's own handling is left alone
        assert (signal.getsignal(signal.SIGTERM), signal.pthread_sigmask(signal.SIG_BLOCK, [])) == handling
        os.kill(forkserver._forkserver._forkserver_pid, signal.SIGTERM)
        assert not wait([worker.process.sentinel], timeout=1.0) and worker.process.is_alive()
        job = TrialJob(spec={}, header={"trial_id": "T1", "row_label": "r", "seed": 0}, data_root=None,
                       download=False, threads=1, executor="local[workers=1]")
        worker.connection.send(job)
        assert worker.connection.recv() == ("record", {"trial_id": "T1", "status": "ok", "error": None})
    finally:
        try:
            worker.connection.send(None)
        except OSError:  # it died: the assertion above says how
            pass
        worker.process.join(timeout=10)


def test_cuda_workers_are_spawned_not_forked_from_a_server():
    """A fork server that initialised CUDA while importing (counting GPUs does) would leave its workers unable
    to use one: CUDA workers start as fresh interpreters."""
    executor = LocalExecutor("local[workers=1]", workers=1)
    executor.device = "cuda"
    assert local_executor._Pool(executor, None, lambda message: None).context.get_start_method() == "spawn"
    executor.device = "cpu"
    assert local_executor._Pool(executor, None, lambda message: None).context.get_start_method() == (
        "forkserver" if sys.platform.startswith("linux") else "spawn")


@pytest.mark.skipif(local_executor._start_method("cpu") != "forkserver", reason="no fork server on this platform")
def test_processes_forked_from_the_fork_server_have_sigterms_default():
    """The server ignores SIGTERM; what it forks must not (another library's processes, on Python 3.14 any
    process of the default start method, would then outlive a SIGTERM), nor start ignoring it on importing
    the module that made the server ignore it."""
    import executor_plugins

    executor = LocalExecutor("local[workers=1]", workers=1)
    executor.device_type("cpu")
    context = local_executor._Pool(executor, 1, lambda message: None).context
    host_end, child_end = context.Pipe()
    process = context.Process(target=executor_plugins.send_whether_sigterm_has_its_default, args=(child_end,))
    process.start()
    child_end.close()
    try:
        assert host_end.recv() is True
    finally:
        process.join(timeout=10)


def test_the_fork_servers_preload_ignores_sigterm_in_the_fork_server_only():
    """Imported anywhere but in the fork server (here: a process of its own), the module leaves SIGTERM alone."""
    script = ("import signal; import noprop_bench_plugins.executors.fork_server; "
              "print(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)")
    assert subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True).stdout.strip() == "True"


@pytest.mark.slow
def test_resume_works_across_executors(tmp_path, keep_threads, capsys):
    out = str(tmp_path / "run")
    small = ["--methods", "backprop", "--dataset", "mnist5k", "--budget", "256samples", "--checkpoints", "0",
             "--threads", "1", "--device", "cpu", "--out", out]
    assert run([*small, "--seeds", "2", "--executor", "local[workers=2]"]) == EXIT_OK
    capsys.readouterr()
    assert run([*small, "--seeds", "3"]) == EXIT_OK  # in-process: only seed 2 is new
    err = capsys.readouterr().err
    assert err.count("skip ") == 2 and "finished 1/1: Backprop with linear head seed 2" in err
    records = _records(tmp_path / "run")
    assert sorted(r["seed"] for r in records) == [0, 1, 2]
    assert [r["executor"] for r in records] == ["local[workers=2]"] * 2 + ["local"]


@pytest.mark.parametrize("engine, executor, extra", [("submitit", "submitit", "slurm"), ("ray", "ray", "ray")])
def test_a_missing_engine_names_the_extra_to_install(engine, executor, extra, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, engine, None)  # makes `import engine` raise ImportError
    with pytest.raises(SystemExit) as stopped:
        main(["--methods", "backprop", "--dataset", "mnist5k", "--executor", executor, "--out", str(tmp_path)])
    assert stopped.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"pip install 'noprop-bench[{extra}]'" in err and f"--executor {executor} needs {engine}" in err
    assert not (tmp_path / "trials.jsonl").exists()


def test_list_shows_every_executor_with_its_options(capsys):
    assert run(["--list"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "Executors:" in out
    assert "local " in out and "workers=0" in out
    assert "submitit" in out and "pip install 'noprop-bench[slurm]'" in out and "partition=''" in out
    assert "ray" in out and "pip install 'noprop-bench[ray]'" in out


def test_local_workers_split_the_cpu_fairly(monkeypatch):
    monkeypatch.setattr(local_executor, "cpu_count", lambda: 16)
    executor = LocalExecutor("local[workers=3]", workers=3)
    assert executor.device_type("cpu") == "cpu"
    assert executor.threads_per_trial(None) == 5  # 16 cores / 3 workers, rounded down
    assert executor.threads_per_trial(2) == 2  # --threads wins
    assert LocalExecutor(workers=32).threads_per_trial(None) == 1
    assert LocalExecutor().threads_per_trial(None) == torch.get_num_threads()  # in-process: this process's


def test_more_cpu_workers_than_cores_are_warned_of(monkeypatch):
    monkeypatch.setattr(local_executor, "cpu_count", lambda: 2)
    executor = LocalExecutor("local[workers=4]", workers=4)
    executor.device_type("cpu")
    assert "4 workers × 1 thread(s) on 2 CPU core(s): the trials share cores" in \
        executor.oversubscription(executor.threads_per_trial(None), 4)
    assert executor.oversubscription(executor.threads_per_trial(None), 2) == ""  # only two trials to run
    assert "2 workers × 2 thread(s)" in executor.oversubscription(2, 2)  # --threads 2 with two workers
    fair = LocalExecutor("local[workers=2]", workers=2)
    fair.device_type("cpu")
    assert fair.oversubscription(fair.threads_per_trial(None), 2) == ""


def test_pool_workers_leave_a_copy_of_their_records_for_a_host_that_was_killed(monkeypatch, tmp_path):
    """The host cannot stop its workers when it is killed; a trial that still finishes must count."""
    handed = []
    monkeypatch.setattr(local_executor._Pool, "run", lambda pool, jobs, deliver: handed.extend(jobs))
    executor = LocalExecutor("local[workers=2]", workers=2)
    executor.device_type("cpu")
    executor.out_dir = str(tmp_path / "run")
    job = TrialJob(spec={}, header={}, plugins=(), plugin_paths=(), data_root=None, download=False, threads=1,
                   executor="local[workers=2]")
    executor.run([job], lambda job, record: None, lambda message: None)
    assert [j.record_copy_dir for j in handed] == [str((tmp_path / "run").resolve())]


def test_local_workers_never_share_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert local_executor.visible_gpus() == ["3", "5"]
    assert LocalExecutor("local[workers=2]", workers=2).device_type("cuda") == "cuda"
    with pytest.raises(Exception, match="3 workers but 2 GPU"):
        LocalExecutor("local[workers=3]", workers=3).device_type("auto")


def test_a_record_names_the_slurm_job_and_array_it_ran_in(monkeypatch):
    """A job of an array logs under OUT/submitit/<array job id>_<task id>/: the record holds both ids."""
    from noprop_bench.executor import worker_identity

    for variable, value in (("SLURM_JOB_ID", "1002"), ("SLURM_ARRAY_JOB_ID", "1000"), ("SLURM_ARRAY_TASK_ID", "2")):
        monkeypatch.setenv(variable, value)
    identity = worker_identity()
    assert (identity["slurm_job_id"], identity["slurm_array_job_id"], identity["slurm_array_task_id"]) == (
        "1002", "1000", "2")


def test_cluster_executors_decide_the_device_from_the_resources_they_request():
    assert SubmititExecutor().device_type("auto") == "cpu"
    assert SubmititExecutor(gpus_per_node=1).device_type("auto") == "cuda"
    asked = SubmititExecutor()
    assert asked.device_type("cuda") == "cuda" and asked.options["gpus_per_node"] == 1
    assert RayExecutor(gpus=1).device_type("auto") == "cuda"
    assert RayExecutor(gpus=1).device_type("cpu") == "cpu"


@needs_submitit
def test_submitit_options_become_the_sbatch_script(tmp_path, monkeypatch):
    from submitit.slurm.slurm import SlurmExecutor

    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # as if srun were on PATH
    spec = ("submitit[cluster=slurm,partition=gpu,gpus_per_node=1,timeout_min=600,cpus_per_task=8,mem_gb=32,"
            "array_parallelism=4,account=lab,gres=nvme:1;tmpfs:10G,exclude=node[3-5,9],nodelist=node[1-8],"
            "setup=module load cuda/12; source ~/env/bin/activate]")
    name, options = parse_method_spec(spec, "executor")  # a node list's commas stay inside its brackets
    assert name == "submitit" and options["exclude"] == "node[3-5,9]"
    assert "slurm_gres" not in SubmititExecutor(gres=" ; ")._parameters()  # no empty --gres line
    SubmititExecutor(gres="gpumem:20g")  # a resource whose name only begins with gpu is not a GPU request
    executor = SubmititExecutor(spec, **SubmititExecutor.resolve_options(options))
    assert "slurm_qos" not in executor._parameters()  # unset options are left to submitit and the cluster
    engine = executor._engine(str(tmp_path / "%j"))  # submitit rejects unknown parameter names here
    assert engine.cluster == "slurm"
    script = engine._executor._make_submission_file_text(command="python -m noprop_bench_job", uid="0")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1", "#SBATCH --time=600",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32GB", "#SBATCH --account=lab",
                 # submitit quotes what a shell would expand
                 "#SBATCH --gres=nvme:1,tmpfs:10G", "#SBATCH --exclude='node[3-5,9]'", "#SBATCH --nodelist='node[1-8]'",
                 "\nmodule load cuda/12\nsource ~/env/bin/activate\n"):
        assert line in script
    assert engine._executor.parameters["array_parallelism"] == 4


def test_slurm_only_options_given_to_the_local_cluster_are_warned_of():
    said = []
    SubmititExecutor("submitit[cluster=local,partition=gpu,exclude=n1]", cluster="local", partition="gpu",
                     exclude="n1", setup="echo hi").check_jobs([], said.append)
    assert said == ["warning: --executor submitit[cluster=local,partition=gpu,exclude=n1]: partition, exclude only "
                    "apply to SLURM jobs; cluster=local runs the jobs on this machine without them"]
    said.clear()
    SubmititExecutor("submitit[cluster=slurm]", cluster="slurm", partition="gpu").check_jobs([], said.append)
    assert said == []


@pytest.mark.parametrize("cluster", ["slurm", "local"])
@pytest.mark.parametrize("cause", ["stopped by SIGTERM", "interrupted by the user (Ctrl-C)"])
def test_a_job_stopped_alone_is_one_interrupted_trial_one_that_saw_ctrl_c_stops_the_run(cluster, cause, tmp_path,
                                                                                        monkeypatch):
    """``scancel`` or a job's time limit stops one trial (recorded interrupted, the run goes on); a local job
    shares the host's terminal, so a trial interrupted by Ctrl-C means Ctrl-C reached them both."""
    jobs = [_job(load_plugins()), _job(load_plugins())]
    stopped = dict(failed_record(jobs[0], cause, status="interrupted"), steps=7)

    class Handle:
        paths = types.SimpleNamespace(result_pickle=Path(__file__))  # a result file exists

        def __init__(self, record):
            self.record, self.job_id = record, "1_0"

        def cancel(self, check):
            pass

        def done(self):
            return True

        def result(self):
            return self.record

    results = iter([stopped, dict(stopped, status="ok")])
    engine = types.SimpleNamespace(cluster=cluster, submit=lambda function, copy: Handle(next(results)),
                                   map_array=lambda function, copies: [Handle(next(results)) for _ in copies])
    executor = SubmititExecutor(f"submitit[cluster={cluster}]", cluster=cluster)
    executor.out_dir = str(tmp_path)
    monkeypatch.setattr(executor, "_engine", lambda folder: engine)
    delivered = []
    if "SIGTERM" in cause:
        executor.run(jobs, lambda job, record: delivered.append(record), lambda message: None)
        assert [(r["status"], r["steps"]) for r in delivered] == [("interrupted", 7), ("ok", 7)]
    else:
        with pytest.raises(KeyboardInterrupt):
            executor.run(jobs, lambda job, record: delivered.append(record), lambda message: None)
        assert [(r["status"], r["steps"]) for r in delivered] == [("interrupted", 7), ("ok", 7)]


@pytest.mark.parametrize("engine", ["ray", "submitit"])
def test_ctrl_c_while_a_finished_trial_is_delivered_keeps_it_and_every_other(engine, tmp_path, monkeypatch):
    """A Ctrl-C that lands while the host stores a job's record (here: the first thing ``deliver`` does)
    waits until the record is stored; then the run stops, keeping every other result that had arrived.
    Before, the job was already out of ``pending`` and its record was lost."""
    from noprop_bench_plugins.executors import ray as ray_executor

    jobs = [_job(load_plugins()) for _ in range(3)]
    for index, job in enumerate(jobs):
        job.header["trial_id"] = f"trial-{index}"
    finished = {job.header["trial_id"]: dict(job.header, status="ok") for job in jobs}
    if engine == "ray":
        fake = types.SimpleNamespace(
            is_initialized=lambda: True, cluster_resources=lambda: {"CPU": 8},
            remote=lambda function: types.SimpleNamespace(options=lambda **_: types.SimpleNamespace(
                remote=lambda job: job.header["trial_id"])),
            wait=lambda references, num_returns, timeout=None: (list(references)[:num_returns], []),
            get=lambda reference: finished[reference], cancel=lambda reference, force: None,
            exceptions=types.SimpleNamespace(TaskCancelledError=type("TaskCancelledError", (Exception,), {})))
        monkeypatch.setattr(ray_executor, "require_engine", lambda *args: fake)
        executor = RayExecutor("ray")
    else:
        class Handle:
            job_id = "1_0"
            paths = types.SimpleNamespace(result_pickle=Path(__file__))  # a result file exists

            def __init__(self, copy):
                self.trial_id = copy.header["trial_id"]

            def done(self):
                return True

            def result(self):
                return finished[self.trial_id]

            def cancel(self, check):
                pass

        executor = SubmititExecutor("submitit[cluster=local]", cluster="local")
        executor.out_dir = str(tmp_path)
        monkeypatch.setattr(executor, "_engine", lambda folder: types.SimpleNamespace(
            cluster="local", submit=lambda function, copy: Handle(copy)))
        monkeypatch.setattr(executor, "_slots", lambda threads: 3)
    delivered = []

    def deliver(job, record):
        if not delivered:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, just as the host begins to store the first record
        delivered.append((job.header["trial_id"], record["status"]))

    with pytest.raises(KeyboardInterrupt):
        executor.run(jobs, deliver, lambda message: None)
    assert delivered == [("trial-0", "ok"), ("trial-1", "ok"), ("trial-2", "ok")]


def test_a_job_whose_worker_never_reported_is_recorded_with_its_identity():
    registry = load_plugins()
    job = _job(registry)
    record = failed_record(job, "worker process 1 died while running this trial: killed by signal 9 (SIGKILL)")
    assert record["status"] == "failed" and "SIGKILL" in record["error"]
    for field in ("trial_id", "method", "row_label", "family", "dataset", "budget", "backbone", "seed"):
        assert record[field] == job.header[field]


def test_a_worker_with_other_plugin_defaults_refuses_the_trial():
    registry = load_plugins()
    job = _job(registry)
    job.header["trial_id"] = "0" * 16  # as if the host had computed it with different defaults
    record = execute_job(job, progress=lambda message: None)
    assert record["status"] == "failed" and "its plugins or their defaults differ" in record["error"]


def test_a_record_finished_while_no_host_listened_is_merged_not_retrained(tmp_path, capsys, keep_threads):
    out = tmp_path / "run"
    job = dataclasses.replace(_job(load_plugins()), record_copy_dir=str(out))
    orphan = execute_job(job, progress=lambda message: None)  # a SLURM job finishing after its host died
    assert orphan["status"] == "ok" and not (out / "trials.jsonl").exists()
    assert run(["--methods", "backprop", "--dataset", "mnist5k", "--budget", "128samples", "--batch-size", "64",
                "--checkpoints", "0", "--seeds", "2", "--device", "cpu", "--threads", "1", "--out", str(out)]) == EXIT_OK
    err = capsys.readouterr().err
    assert "recorded Backprop with linear head seed 0: it finished after the last run's host had stopped" in err
    assert "skip Backprop with linear head seed 0" in err and "finished 1/1: Backprop with linear head seed 1" in err
    records = _records(out)
    assert [r["seed"] for r in records] == [0, 1] and records[0] == json.loads(json.dumps(orphan, default=str))
    assert not (out / "unmerged-records").exists()  # every copy merged, and the folder gone with them


def _spec(registry):
    """Backprop on mnist5k for 128 samples: a trial small enough to run inside a test."""
    from noprop_bench.run.budget import Budget
    from noprop_bench.run.runner import TrialSpec

    method = registry.method("backprop")
    return TrialSpec(method=method, params=method.resolve_params({}), dataset="mnist5k", backbone="noprop_cnn",
                     budget=Budget.parse("128samples"), seed=0, batch_size=64, device=torch.device("cpu"),
                     augment="none", checkpoints=0)


def _job(registry) -> TrialJob:
    from noprop_bench.run.runner import trial_header

    spec = _spec(registry)
    return TrialJob(header=trial_header(spec), spec=spec.plain_fields(), data_root=None, download=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_worker_trains_on_its_own_gpu(tmp_path):
    out = tmp_path / "run"
    assert run(["--methods", "backprop", "--dataset", "mnist5k", "--budget", "1024samples", "--checkpoints", "0",
                "--device", "cuda", "--executor", "local[workers=1]", "--out", str(out)]) == EXIT_OK
    record = _records(out)[0]
    assert record["environment"]["device"] == "cuda"
    assert record["worker"]["cuda_visible_devices"] == local_executor.visible_gpus()[0]
    assert record["peak_memory_bytes"] > 0 and record["memory_kind"] == "cuda_max_allocated"
    json.dumps(record)


def _ctrl_c_reaches_it():
    """As in a terminal: a shell starts background jobs (a CI step, say) with SIGINT ignored, and the
    host would inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _as_a_background_job_of_a_script():
    """A non-interactive shell starts ``command &`` with SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _fake_plugins_env():
    return {**os.environ, "RAY_DEDUP_LOGS": "0",  # each Ray task's progress lines as they come, none merged
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.slow
def test_ctrl_c_stops_the_workers_and_keeps_what_their_trials_measured(tmp_path):
    """The workers stop their trials and send their records: an interrupted trial keeps its steps and
    checkpoints, not a blank record written by the host."""
    out = tmp_path / "run"
    host = subprocess.Popen(
        [sys.executable, "-m", "noprop_bench", "--plugin", "fake_plugins", "--dataset", "tiny", "--methods",
         "steady[predict_sleep=0,step_sleep=0.02]", "--seeds", "3", "--budget", "60", "--checkpoints", "30",
         "--threads", "1", "--executor", "local[workers=2]", "--out", str(out)],
        stderr=subprocess.PIPE, text=True, env=_fake_plugins_env(), preexec_fn=_ctrl_c_reaches_it)
    lines, evaluated = [], set()
    while len(evaluated) < 2:  # both workers have trained and evaluated a checkpoint
        line = host.stderr.readline()
        assert line, "".join(lines)
        lines.append(line)
        if "test acc" in line and line.lstrip().startswith("[worker"):
            evaluated.add(line.split("]")[0])
    workers = [int(line.split("pid ")[1].split(",")[0]) for line in lines if "started (pid" in line]
    host.send_signal(signal.SIGINT)
    err = host.communicate(timeout=60)[1]
    assert host.returncode == 130, err
    assert "Rerun with --out" in err and "stopping 2 worker(s)" in err
    records = _records(out)
    assert sorted((r["seed"], r["status"]) for r in records) == [(0, "interrupted"), (1, "interrupted")]
    for record in records:
        assert record["steps"] > 0 and record["curve"], record  # what the trial measured is kept
        assert record["error"] == "interrupted by the user (Ctrl-C)"
        assert record["worker"]["pid"] in workers
    for pid in workers:  # no worker is left training
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def _host_until_trials_evaluated(tmp_path, executor, trials, budget="60", started=_ctrl_c_reaches_it):
    """A host running ``trials`` seeds of a steady fake method under ``executor`` in a session of its own
    (as a terminal runs a command, or ``started`` otherwise), once every trial has evaluated a checkpoint; and
    its stderr's file. Workers' progress reaches the host's stderr; submitit jobs' goes to their logs."""
    out, err = tmp_path / "run", tmp_path / "host.err"
    host = subprocess.Popen(
        [sys.executable, "-m", "noprop_bench", "--plugin", "fake_plugins", "--dataset", "tiny", "--methods",
         "steady[predict_sleep=0,step_sleep=0.02]", "--seeds", str(trials), "--budget", budget, "--checkpoints", "30",
         "--threads", "1", "--executor", executor, "--out", str(out)],
        stderr=err.open("w"), text=True, env=_fake_plugins_env(), preexec_fn=started, start_new_session=True)
    deadline = time.monotonic() + 120
    while _trials_evaluated([err, *out.glob("submitit/*/*_log.err")]) < trials:
        assert host.poll() is None and time.monotonic() < deadline, err.read_text()
        time.sleep(0.2)
    return host, out, err


def _trials_evaluated(logs) -> int:
    """How many trials have printed a checkpoint's accuracy: a worker's or Ray task's lines in the host's log,
    a job's in its own."""
    trials = set()
    for log in logs:
        for line in log.read_text().splitlines():
            if "test acc" in line:
                line = re.sub(r"\x1b\[[0-9;]*m", "", line).lstrip()  # Ray colours its tasks' prefixes
                trials.add(line.split("]")[0] if line.startswith("[worker")
                           else line.split(")")[0] if line.startswith("(") else log)  # a Ray task's line
    return len(trials)


@pytest.mark.slow
@pytest.mark.parametrize("executor, stop, cause", [
    pytest.param("local[workers=2]", "SIGTERM to the process group", "stopped by SIGTERM", id="local-group-sigterm"),
    pytest.param("submitit[cluster=local]", "Ctrl-C in the terminal", "interrupted by the user (Ctrl-C)",
                 id="submitit-ctrl-c", marks=needs_submitit),
    pytest.param("submitit[cluster=local]", "SIGTERM to the host", "stopped by SIGTERM", id="submitit-sigterm",
                 marks=needs_submitit),
    pytest.param("ray", "Ctrl-C to the host", "interrupted by the user (Ctrl-C)", id="ray-ctrl-c", marks=needs_ray),
    # ray.init puts in a SIGTERM handler of its own, which exited the host at once
    pytest.param("ray", "SIGTERM to the host", "stopped by SIGTERM", id="ray-sigterm", marks=needs_ray),
])
def test_trials_stopped_in_workers_or_jobs_keep_what_they_measured(tmp_path, executor, stop, cause):
    """A signal that reaches the trials' own processes (a terminal's Ctrl-C or a SIGTERM sent to the whole
    process group; a cancelled submitit job or Ray task) stops their trials, which return their steps and
    checkpoints."""
    host, out, log = _host_until_trials_evaluated(tmp_path, executor, trials=2)
    if stop.endswith("to the host"):
        host.send_signal(signal.SIGTERM if "SIGTERM" in stop else signal.SIGINT)
    else:
        os.killpg(host.pid, signal.SIGTERM if "SIGTERM" in stop else signal.SIGINT)
    _both_trials_stopped_keeping_what_they_measured(host, out, log, cause)


def _both_trials_stopped_keeping_what_they_measured(host, out, log, cause):
    host.wait(timeout=90)
    err = log.read_text()
    assert host.returncode == 130, err
    records = _records(out)
    assert sorted((r["seed"], r["status"]) for r in records) == [(0, "interrupted"), (1, "interrupted")], err
    for record in records:
        assert record["steps"] > 0 and record["curve"], (record, err)
        assert record["error"] == cause


@pytest.mark.slow
def test_a_run_in_the_background_ignores_sigint_and_stops_its_workers_trials_on_sigterm(tmp_path):
    """A script's ``noprop-bench --executor "local[workers=2]" &``: a Ctrl-C in its terminal (SIGINT to the
    whole process group) stops nothing, as the shell asked; a SIGTERM to the host stops the run as Ctrl-C
    does, and the workers' trials keep what they measured."""
    host, out, log = _host_until_trials_evaluated(tmp_path, "local[workers=2]", trials=2,
                                                  started=_as_a_background_job_of_a_script)
    os.killpg(host.pid, signal.SIGINT)
    time.sleep(1.0)
    assert host.poll() is None, log.read_text()
    host.send_signal(signal.SIGTERM)
    _both_trials_stopped_keeping_what_they_measured(host, out, log, "stopped by SIGTERM")


def test_a_sigterm_while_ray_starts_stops_the_run_as_ctrl_c_does():
    """ray.init puts in a SIGTERM handler that raises SystemExit; a SIGTERM before the host's handler is back
    must still stop the run as Ctrl-C does (tables written), not end the host with status 15."""
    from noprop_bench.run.interrupts import forget_sigterm, sigterm_noted

    def init(**options):
        raise SystemExit(15)

    fake_ray = types.SimpleNamespace(is_initialized=lambda: False, init=init)
    try:
        with pytest.raises(KeyboardInterrupt):
            RayExecutor("ray")._connect(fake_ray)
        assert sigterm_noted()
    finally:
        forget_sigterm()


def test_a_late_ray_cancel_neither_takes_a_finished_record_nor_stops_the_workers_next_trial(monkeypatch):
    """Ray reuses a worker process for later tasks. A gentle cancel that lands after a trial ended (while Ray
    stores its result: a KeyboardInterrupt there would replace the record) must not raise, nor stop the
    next trial that worker trains."""
    from noprop_bench.run import interrupts
    from noprop_bench_plugins.executors import ray as ray_executor

    trained = []

    def trial(job):
        with interrupts.stoppable():
            trained.append(job)
        return {"status": "ok"}

    monkeypatch.setattr(ray_executor, "execute_job", trial)
    before = signal.getsignal(signal.SIGINT)
    try:
        assert ray_executor.run_task("first") == {"status": "ok"}
        os.kill(os.getpid(), signal.SIGINT)  # as ray.cancel(force=False) delivers it, the trial already over
        time.sleep(0.05)
        assert ray_executor.run_task("second") == {"status": "ok"}
    finally:
        signal.signal(signal.SIGINT, before)
        interrupts.forget_pending_stop()
    assert trained == ["first", "second"]


@pytest.mark.slow
def test_a_sigterm_to_one_worker_interrupts_its_trial_alone_and_the_run_goes_on(tmp_path):
    """Before, the worker died and its trial was failed with nothing kept; a first fix then stopped the whole
    run. The stopped trial keeps what it measured, the other trial finishes."""
    host, out, log = _host_until_trials_evaluated(tmp_path, "local[workers=2]", trials=2, budget="3")
    worker = int(next(line for line in log.read_text().splitlines() if "started (pid" in line)
                 .split("pid ")[1].split(",")[0])
    os.kill(worker, signal.SIGTERM)
    host.wait(timeout=90)
    err = log.read_text()
    assert host.returncode == EXIT_TRIAL_FAILED, err
    records = {r["status"]: r for r in _records(out)}
    assert sorted(records) == ["interrupted", "ok"], err
    assert records["interrupted"]["steps"] > 0 and records["interrupted"]["worker"]["pid"] == worker
    assert records["interrupted"]["error"] == "stopped by SIGTERM"


@pytest.mark.parametrize("cause, stops_the_run", [
    ("interrupted by the user (Ctrl-C)", True),  # Ctrl-C reaches every process of the terminal
    ("stopped by SIGTERM", False),  # a SIGTERM to this trial's worker or job alone
    ("stopped at its job's time limit", False),
])
def test_only_a_trial_that_saw_ctrl_c_stops_the_run(cause, stops_the_run):
    from noprop_bench.run import interrupts
    from noprop_bench.run.jobs import stop_if_interrupted

    record = {"status": "interrupted", "error": cause}
    if stops_the_run:
        with pytest.raises(KeyboardInterrupt):
            stop_if_interrupted(record)
    else:
        stop_if_interrupted(record)
        interrupts.note_sigterm()  # unless this host is being stopped by a SIGTERM itself
        try:
            with pytest.raises(KeyboardInterrupt):
                stop_if_interrupted(record)
        finally:
            interrupts.forget_sigterm()
    stop_if_interrupted({"status": "failed", "error": cause})


@needs_submitit
@pytest.mark.parametrize("submitit_says", ["out of time", "preempted"])
def test_a_jobs_time_limit_stops_its_trial_and_a_preempted_job_is_requeued_as_submitit_does(submitit_says):
    """submitit signals a job before its time limit; out of time, its handler raises (inside the trial, which
    then failed); preempted, it requeues the job and exits. The first now stops the trial."""
    from noprop_bench.run import interrupts
    from noprop_bench_plugins.executors.submitit import _stop_at_the_time_limit

    def submitits(signum, frame):
        if submitit_says == "preempted":
            raise SystemExit(0)
        raise RuntimeError("Job not requeued because: timed-out and not checkpointable.")

    notice = signal.SIGUSR2
    previous = signal.signal(notice, submitits)
    try:
        _stop_at_the_time_limit()
        with pytest.raises(KeyboardInterrupt if submitit_says == "out of time" else SystemExit):
            with interrupts.stoppable():
                os.kill(os.getpid(), notice)
                time.sleep(5)
        if submitit_says == "out of time":
            assert interrupts.stop_cause() == "stopped at its job's time limit"
    finally:
        signal.signal(notice, previous)
        interrupts._at_time_limit.clear()


@needs_submitit
@pytest.mark.parametrize("then_a_notice", [False, True])
def test_on_slurm_a_sigterm_stops_the_trial_unless_a_preemption_notice_follows(then_a_notice, monkeypatch):
    """SLURM may send a SIGTERM just before a preemption notice: submitit must still requeue the job then; a
    SIGTERM alone (scancel) stops the trial once the grace has passed."""
    from noprop_bench.run import interrupts
    from noprop_bench_plugins.executors import submitit as submitit_executor

    def submitits(signum, frame):  # a preempted job: submitit requeues it and exits
        raise SystemExit(0)

    monkeypatch.setattr(submitit_executor, "SIGTERM_GRACE_SECONDS", 0.3)
    saved = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGALRM, signal.SIGUSR2)}
    signal.signal(signal.SIGUSR2, submitits)
    try:
        submitit_executor._stop_after_a_sigterm_settles()
        submitit_executor._stop_at_the_time_limit()
        with pytest.raises(SystemExit if then_a_notice else KeyboardInterrupt):
            with interrupts.stoppable():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.1)  # the trial goes on meanwhile
                if then_a_notice:
                    os.kill(os.getpid(), signal.SIGUSR2)
                time.sleep(5)
        assert interrupts.stop_cause() == ("interrupted by the user (Ctrl-C)" if then_a_notice else
                                           "stopped by SIGTERM")
        time.sleep(0.5)  # no stop comes later from the SIGTERM that was part of the notice
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for number, handler in saved.items():
            signal.signal(number, handler)
        interrupts.forget_sigterm()


def test_a_stop_interrupts_a_trial_even_before_it_begins_and_never_a_trial_that_ended():
    from noprop_bench.run import interrupts

    with pytest.raises(KeyboardInterrupt):
        with interrupts.stoppable():
            interrupts.stop_trial(None, None)  # while it trains
    interrupts.stop_trial(None, None)  # before it begins (the worker was loading its data): nothing raised now
    with pytest.raises(KeyboardInterrupt):
        with interrupts.stoppable():  # but the trial stops as it begins
            pytest.fail("the trial ran")
    with interrupts.stoppable():  # the stop was taken once
        pass


def _ignore_the_stop_signal_and_sleep():
    signal.signal(local_executor.STOP_SIGNAL, signal.SIG_IGN)
    time.sleep(60)


@pytest.mark.skipif(local_executor.STOP_SIGNAL is None, reason="no SIGUSR1 on this platform")
def test_a_worker_that_does_not_stop_in_time_is_killed_and_its_trial_recorded_as_interrupted(monkeypatch):
    import multiprocessing

    process = multiprocessing.get_context("fork").Process(target=_ignore_the_stop_signal_and_sleep)
    host_end, worker_end = multiprocessing.Pipe()
    process.start()
    time.sleep(0.2)  # its handler is set
    said, delivered = [], []
    pool = local_executor._Pool.__new__(local_executor._Pool)
    pool.say = said.append
    monkeypatch.setattr(pool, "stop_grace_seconds", 0.5)
    job = _job(load_plugins())
    worker = local_executor._Worker(0, process, host_end, job=job)
    started = time.monotonic()
    pool._stop([worker], lambda job, record: delivered.append(record))
    assert time.monotonic() - started < 5
    process.join(timeout=5)
    assert not process.is_alive()
    assert [r["status"] for r in delivered] == ["interrupted"] and delivered[0]["steps"] == 0
    assert said == ["stopping 1 worker(s): waiting up to 0.5s for what they measured (Ctrl-C again to stop "
                    "them now)"]


def test_ctrl_c_is_held_until_a_message_to_or_from_a_worker_is_whole():
    """Raised halfway through a pipe read, KeyboardInterrupt would leave the pipe mid-message and the host's
    next read (collecting what the workers finished) would block for good."""
    steps = []
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    try:
        with pytest.raises(KeyboardInterrupt):
            with local_executor.whole_messages():
                os.kill(os.getpid(), signal.SIGINT)
                steps.append("after the signal")  # still runs: the interrupt waits for the block's end
                steps.append("message whole")
        assert steps == ["after the signal", "message whole"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with local_executor.whole_messages():
            steps.append("no signal")  # and nothing is raised without one
        assert steps[-1] == "no signal"
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_a_record_a_worker_sent_before_the_interrupt_killed_it_is_kept():
    """A SIGTERM to the whole process group kills the workers too; what they had already sent is a finished
    trial, and must not be recorded as interrupted."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    host_end, worker_end = context.Pipe()
    worker_end.send(("progress", "training done"))
    worker_end.send(("record", {"trial_id": "t", "status": "ok"}))
    worker_end.close()
    process = context.Process(target=int)  # a worker that has already exited
    process.start()
    process.join()
    said = []
    pool = local_executor._Pool.__new__(local_executor._Pool)
    pool.say = said.append
    worker = local_executor._Worker(0, process, host_end, job="a job")
    assert pool._arrived(worker) == {"trial_id": "t", "status": "ok"}
    assert said == ["  [worker 0] training done"]
    assert pool._arrived(worker) is None  # taken once


def test_a_record_being_stored_when_ctrl_c_came_is_stored_not_replaced_by_interrupted(monkeypatch, tmp_path):
    """The held Ctrl-C is raised as the append ends: the trial finished, and must not also be 'interrupted'."""
    import executor_plugins

    monkeypatch.setattr(local_executor, "_worker_main", executor_plugins.worker_that_answers_at_once)
    executor = LocalExecutor("local[workers=1]", workers=1)
    executor.device_type("cpu")
    pool = local_executor._Pool(executor, 1, lambda message: None)
    job = TrialJob(spec={}, header={"trial_id": "T1", "row_label": "r", "seed": 0}, data_root=None, download=False,
                   threads=1, executor="local[workers=1]")
    store = TrialStore(tmp_path)
    interrupts = [KeyboardInterrupt, KeyboardInterrupt]  # Ctrl-C twice, each held until a line is whole

    def deliver(job, record):
        store.append(record)
        if interrupts and record["status"] == "ok":
            raise interrupts.pop()

    with pytest.raises(KeyboardInterrupt):
        pool.run([job], deliver)
    assert [r["status"] for r in store.read()[0]] == ["ok"]  # stored once, and never "interrupted"


@pytest.mark.skipif(local_executor.STOP_SIGNAL is None, reason="no SIGUSR1 on this platform")
def test_a_second_ctrl_c_while_records_are_collected_still_stops_the_workers_and_records_their_trials(
        monkeypatch, tmp_path):
    import executor_plugins

    worker = executor_plugins.worker_that_finishes_t1_and_ignores_stops_on_t2
    monkeypatch.setattr(local_executor, "_worker_main", worker)
    monkeypatch.setattr(local_executor._Pool, "stop_grace_seconds", 0.5)
    executor = LocalExecutor("local[workers=2]", workers=2)
    executor.device_type("cpu")
    pool = local_executor._Pool(executor, 1, lambda message: None)
    jobs = [TrialJob(spec={}, header={"trial_id": name, "row_label": "r", "seed": 0}, data_root=None, download=False,
                     threads=1, executor="local[workers=2]") for name in ("T1", "T2")]
    store = TrialStore(tmp_path)
    interrupts = [KeyboardInterrupt, KeyboardInterrupt]  # Ctrl-C, then again while T1's record is stored again
    started = []
    original_start = pool._start

    def start(number):
        worker = original_start(number)
        started.append(worker.process)
        return worker

    def deliver(job, record):
        store.append(record)
        if interrupts and record["status"] == "ok":
            raise interrupts.pop()

    monkeypatch.setattr(pool, "_start", start)
    with pytest.raises(KeyboardInterrupt):
        pool.run(jobs, deliver)
    assert {r["trial_id"]: r["status"] for r in latest_per_trial(store.read()[0])} == {"T1": "ok", "T2": "interrupted"}
    for process in started:
        process.join(timeout=5)
        assert not process.is_alive()  # no worker left behind


def test_an_identical_record_appended_twice_in_a_row_is_written_once(tmp_path):
    store = TrialStore(tmp_path)
    first, other = {"trial_id": "a", "status": "ok"}, {"trial_id": "b", "status": "ok"}
    for record in (first, first, other, first):
        store.append(record)
    assert [r["trial_id"] for r in store.read()[0]] == ["a", "b", "a"]


def test_ctrl_c_held_leaves_an_ignored_sigint_alone_and_holds_the_sigterm_a_run_takes_as_ctrl_c():
    """An ignored SIGINT stays ignored (processes started meanwhile inherit that); a run started so takes a
    SIGTERM as its Ctrl-C, and that is what must wait until the block ends."""
    from noprop_bench.run.interrupts import ctrl_c_held

    seen = []
    inherited = signal.signal(signal.SIGINT, signal.SIG_IGN)
    handler = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with ctrl_c_held():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert seen == []
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, inherited)


def test_ctrl_c_while_a_record_is_appended_leaves_it_whole(tmp_path, monkeypatch):
    from noprop_bench.run import store as store_module

    real_write = store_module.write_fully

    def interrupted_write(fd, data):  # the signal arrives as the record is about to be written
        os.kill(os.getpid(), signal.SIGINT)
        real_write(fd, data)

    monkeypatch.setattr(store_module, "write_fully", interrupted_write)
    store = store_module.TrialStore(tmp_path)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):  # raised, once the record is whole on disk
            store.append({"trial_id": "t", "status": "ok"})
    finally:
        signal.signal(signal.SIGINT, inherited)
    records, skipped = store.read()
    assert [r["trial_id"] for r in records] == ["t"] and not skipped


def test_submitit_refuses_to_fall_back_to_this_machine_without_slurm(monkeypatch, tmp_path, capsys):
    from noprop_bench_plugins.executors import submitit as submitit_executor

    monkeypatch.setattr(submitit_executor.shutil, "which", lambda name: None)
    for spec in ("submitit[partition=gpu,gpus_per_node=1]", "submitit[cluster=slurm]"):
        with pytest.raises(SystemExit) as stopped:
            main(["--methods", "backprop", "--dataset", "mnist5k", "--executor", spec, "--out", str(tmp_path)])
        assert stopped.value.code == EXIT_USAGE
        assert "no SLURM here (srun is not on PATH)" in capsys.readouterr().err
    SubmititExecutor("submitit[cluster=local]", cluster="local").check_available()  # asked for: fine


@needs_submitit
@pytest.mark.parametrize("spec, message", [
    ("submitit[cluster=local,timeout_min=-5]", "timeout_min must be a positive number of minutes"),
    ("submitit[cluster=local,cpus_per_task=-2]", "cpus_per_task must not be negative"),
    ("submitit[cluster=local,gpus_per_node=-1,array_parallelism=-1]", "gpus_per_node, array_parallelism must not "
                                                                       "be negative"),
    ("submitit[cluster=local,gpus_per_node=1]", "cluster=local runs the jobs on this machine, which has no CUDA"),
])
def test_submitit_refuses_resources_it_cannot_have_before_any_job(spec, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as stopped:
        main(["--methods", "backprop", "--dataset", "mnist5k", "--executor", spec, "--out", str(tmp_path / "run")])
    assert stopped.value.code == EXIT_USAGE
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    if "gpus_per_node=1" in spec:  # unless the run asks for the CPU
        assert SubmititExecutor(spec, cluster="local", gpus_per_node=1).device_type("cpu") == "cpu"


@needs_submitit
def test_submitit_refuses_a_seconds_budget_that_fills_a_jobs_time_limit(tmp_path, capsys):
    """Every job would be stopped at its limit, and a rerun would only start it again from the beginning."""
    with pytest.raises(SystemExit) as stopped:
        main(["--methods", "backprop", "--dataset", "mnist5k", "--budget", "120", "--device", "cpu",
              "--executor", "submitit[cluster=local,timeout_min=2]", "--out", str(tmp_path / "a" / "run")])
    assert stopped.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "a trial's budget of 120 s of training alone fills a job's time limit (timeout_min=2, 120 s)" in err
    assert "trial(s) on" not in err  # before the run is announced
    assert not (tmp_path / "a").exists()  # refused before the run directory (or its parent) was made


def test_submitit_warns_when_a_seconds_budget_leaves_little_of_a_jobs_time_limit(monkeypatch):
    said = []
    executor = SubmititExecutor("submitit[timeout_min=2]", timeout_min=2)
    long, short, counted = (dataclasses.replace(_job(load_plugins()), spec={**_job(load_plugins()).spec,
                                                                             "budget": budget})
                            for budget in ("100s", "60s", "100000samples"))
    executor.check_jobs([short, long], said.append)
    assert said == ["warning: a trial's budget of 100 s of training leaves 20 s of a job's time limit "
                    "(timeout_min=2) for loading, warm-up and evaluation; a job stopped at its limit starts again "
                    "from the beginning when rerun, so raise timeout_min if that is too little"]
    said.clear()
    executor.check_jobs([short], said.append)  # 60 of 120 s: room enough
    executor.check_jobs([counted], said.append)  # a sample budget's duration is not known beforehand
    assert said == [] and counted.budget_seconds is None and long.budget_seconds == 100


def test_a_crashed_submitit_job_is_failed_with_its_exception_not_submitits_banner():
    from noprop_bench_plugins.executors import submitit as submitit_executor

    class Crashed:
        job_id, state = "42", "FAILED"

        class paths:
            stderr = "OUT/submitit/42/42_0_log.err"

        def result(self):
            raise RuntimeError("Job (task=0) failed during processing with trace:\n----------------------\n"
                               "Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                               "RuntimeError: set_num_threads expects a positive integer\n")

    job = TrialJob(spec={}, header={"trial_id": "T"}, data_root=None, download=False)
    record = submitit_executor.SubmititExecutor._result(job, Crashed())
    assert record["status"] == "failed"
    assert ("job 42 (FAILED) returned no result: RuntimeError: Job (task=0) failed during processing with trace: "
            "RuntimeError: set_num_threads expects a positive integer; its log: OUT/submitit/42/42_0_log.err"
            ) == record["error"]


def test_submitit_local_cluster_runs_one_job_per_core_share(monkeypatch):
    from noprop_bench_plugins.executors import submitit as submitit_executor

    monkeypatch.setattr(submitit_executor, "cpu_count", lambda: 8)
    here = SubmititExecutor(cluster="local")
    assert here.threads_per_trial(None) == 1 and here._slots(1) == 8 and here._slots(3) == 2
    assert SubmititExecutor(cluster="local", gpus_per_node=1)._slots(1) == 1  # it would hand every job GPU 0
    assert SubmititExecutor(cluster="slurm")._slots(None) > 1000  # SLURM schedules the whole array
    assert SubmititExecutor(cluster="slurm").threads_per_trial(None) is None


@needs_ray
def test_ray_refuses_trials_larger_than_the_cluster_it_started(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["--methods", "backprop", "--dataset", "mnist5k", "--executor", "ray[cpus=512]", "--out", str(tmp_path)])
    assert stopped.value.code == EXIT_USAGE
    assert "512 CPU(s) per trial but the cluster has" in capsys.readouterr().err


@pytest.mark.parametrize("executor", ["local", "local[workers=2]"])
def test_a_backbone_that_cannot_take_the_images_is_bad_input_before_any_trial(executor, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["--methods", "backprop", "--dataset", "mnist5k", "--backbone", "levit_128", "--executor", executor,
              "--out", str(tmp_path / "run")])
    assert stopped.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "backbone 'levit_128' cannot take 28x28 images" in err and "worker" not in err
    assert not (tmp_path / "run").exists()


def test_only_finished_records_left_by_workers_are_merged(tmp_path):
    store = TrialStore(tmp_path)
    header = _job(load_plugins()).header
    store.write_record_file({**header, "status": "ok", "test_acc_runs": [50.0]})
    store.write_record_file({**header, "trial_id": "f" * 16, "status": "interrupted"})
    merged = store.merge_record_files()
    assert [r["status"] for r in merged] == ["ok"] and [r["status"] for r in _records(tmp_path)] == ["ok"]
    assert list(store.record_files_dir.iterdir()) == []  # the interrupted copy is dropped, not merged


def test_workers_get_the_data_root_as_an_absolute_path(tmp_path, monkeypatch):
    from noprop_bench.cli import _job as cli_job, build_parser

    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["--data-root", "data", "--threads", "1"])
    job = cli_job(_spec(load_plugins()), args, LocalExecutor("local[workers=2]", workers=2))
    assert job.data_root == str(tmp_path / "data") and job.threads == 1 and job.executor == "local[workers=2]"
    assert cli_job(_spec(load_plugins()), build_parser().parse_args([]), LocalExecutor()).data_root is None



@pytest.mark.parametrize("started", [_ctrl_c_reaches_it, _as_a_background_job_of_a_script],
                         ids=["in-a-terminal", "in-the-background"])
def test_sigterm_stops_a_run_as_ctrl_c_does_keeping_finished_trials_and_writing_the_tables(tmp_path, started):
    """CI systems and schedulers cancel a job with SIGTERM: the finished trials and the tables must survive,
    also where SIGINT is ignored (which a SIGINT sent first then shows it still is)."""
    out = tmp_path / "run"
    env = _fake_plugins_env()
    host = subprocess.Popen(
        [sys.executable, "-m", "noprop_bench", "--plugin", "fake_plugins", "--dataset", "tiny", "--methods",
         "steady[predict_sleep=0,step_sleep=0.02],sleepy[predict_sleep=0,step_sleep=0.02]", "--budget", "4",
         "--checkpoints", "3", "--threads", "1", "--out", str(out)],
        stderr=subprocess.PIPE, text=True, env=env, preexec_fn=started)
    lines = []
    while not any(line.startswith("Sleepy") and "% of 4s" in line for line in lines):  # the second trial trains
        line = host.stderr.readline()
        assert line, "".join(lines)
        lines.append(line)
    if started is _as_a_background_job_of_a_script:
        host.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert host.poll() is None, "".join(lines)
    host.send_signal(signal.SIGTERM)
    err = host.communicate(timeout=60)[1]
    assert host.returncode == 130, "".join(lines) + err
    assert "Rerun with --out" in err
    assert sorted(r["status"] for r in _records(out)) == ["interrupted", "ok"]
    stopped = next(r for r in _records(out) if r["status"] == "interrupted")
    assert stopped["error"] == "stopped by SIGTERM"  # not "by the user"
    assert (out / "table1.md").exists()


def test_progress_lines_say_what_became_of_each_trial():
    """``finished k/N`` only for a trial whose result is kept; a failed or interrupted one is named as such, with
    what a rerun does about it."""
    job = TrialJob(spec={}, header={"trial_id": "T1", "row_label": "Backprop", "seed": 2}, data_root=None,
                   download=False)
    progress = Progress(total=4)
    lines = [progress.line(job, {"status": "ok", "test_acc": 97.125, "worker": {"host": "node7"}}),
             progress.line(job, {"status": "diverged", "error": "NaN loss at step 3"}),
             progress.line(job, {"status": "failed", "error": "RuntimeError: boom"}),
             progress.line(job, {"status": "interrupted", "error": "Ctrl-C"})]
    assert lines == [
        "finished 1/4: Backprop seed 2: ok, test acc 97.12% (on node7)",
        "finished 2/4: Backprop seed 2: diverged: NaN loss at step 3",
        "failed 3/4: Backprop seed 2: RuntimeError: boom; a run resumed in the same --out tries it again",
        "interrupted 4/4: Backprop seed 2: Ctrl-C; a run resumed in the same --out tries it again"]


@pytest.mark.parametrize("mode, expected", [
    ("skip", {0: "ok", 1: "failed"}), ("raise", {0: "ok", 1: "failed"}), ("bare", {0: "failed", 1: "failed"}),
    ("swap", {0: "failed", 1: "ok"}), ("twice", {0: "ok", 1: "ok"}), ("changed", {0: "ok", 1: "ok"})])
def test_what_an_executor_delivers_wrongly_or_not_at_all_is_recorded_not_lost(mode, expected, tmp_path, one_thread,
                                                                               capsys):
    """A trial an executor never delivers, or delivers as something other than its record, is a failed trial
    of this run (the grid says so and a rerun trains it); an executor that raises keeps what it delivered;
    a second delivery of one trial is ignored."""
    out = tmp_path / mode
    code = run(["--plugin", "fake_plugins", "--plugin", "executor_plugins", "--dataset", "tiny", "--methods", "linear",
                "--budget", "64samples", "--seeds", "2", "--checkpoints", "0", "--executor", f"sloppy[mode={mode}]",
                "--out", str(out)])
    records = _records(out)
    assert {r["seed"]: r["status"] for r in records} == expected and len(records) == 2
    assert code == (EXIT_OK if "failed" not in expected.values() else EXIT_TRIAL_FAILED)
    err = capsys.readouterr().err
    causes = {"skip": "executor 'sloppy[mode=skip]' returned without delivering this trial",
              "raise": "executor 'sloppy[mode=raise]' failed before delivering this trial: ConnectionError: lost the "
                       "queue after the first job",
              "bare": "executor 'sloppy[mode=bare]' delivered the record of trial None, not of this trial",
              "swap": "executor 'sloppy[mode=swap]' delivered the record of trial"}
    if mode in causes:
        failed = [r for r in records if r["status"] == "failed"]
        assert all(causes[mode] in r["error"] for r in failed), [r["error"] for r in failed]
        assert (out / "table1.md").exists() and "Traceback" not in err
    if mode == "twice":  # the same record again is stored once and counted once
        assert "again" not in err and "finished 3/2" not in err
    if mode == "changed":
        assert err.count("delivered Linear (one-hot) seed 0 again with another record; the first is kept") == 1
        assert all(r["test_acc"] > 0 for r in records)


def test_a_failure_of_the_hosts_own_store_is_not_blamed_on_the_executor(tmp_path, one_thread, monkeypatch, capsys):
    from noprop_bench.run.store import TrialStore

    def full_disk(self, record):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(TrialStore, "append", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        run(["--plugin", "fake_plugins", "--dataset", "tiny", "--methods", "linear", "--budget", "64samples",
             "--checkpoints", "0", "--out", str(tmp_path / "run")])
    assert "executor 'local' failed" not in capsys.readouterr().err
