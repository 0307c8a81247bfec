"""A method for the executor tests that kills its own worker process once, in the middle of training."""

import os
import signal
from pathlib import Path

from noprop_bench import hookimpl
from noprop_bench.executor import Executor, execute_job
from noprop_bench_plugins.methods.backprop import Backprop


class Doomed(Backprop):
    """Backprop, except that the trial with seed ``die_at_seed`` SIGKILLs its process at its third step,
    the first time it runs (``marker`` is created then, so the rerun trains normally)."""

    name = "doomed"
    label = "Doomed"
    defaults = {**Backprop.defaults, "die_at_seed": 1, "marker": ""}

    def __init__(self, task, **params):
        super().__init__(task, **params)
        self.steps_taken = 0

    def train_step(self, x, y):
        self.steps_taken += 1
        marker = Path(self.params["marker"])
        if self.task.seed == self.params["die_at_seed"] and self.steps_taken == 3 and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return super().train_step(x, y)


class EnvironmentEcho(Backprop):
    """Fails as it is built, naming the value of ``$NOPROP_ECHO`` in its process: what environment a worker has."""

    name = "environment_echo"
    label = "Environment echo"

    def __init__(self, task, **params):
        raise RuntimeError(f"NOPROP_ECHO={os.environ.get('NOPROP_ECHO')}")


class Sloppy(Executor):
    """An executor with the mistakes a new one may make (``mode``): it skips the last job (``skip``), raises
    after the first (``raise``), delivers a bare dict (``bare``), the second job's record for the first
    (``swap``), every record twice (``twice``, as an executor's recovery after Ctrl-C may), or a changed
    record after each (``changed``)."""

    name = "sloppy"
    defaults = {"mode": "skip"}

    def run(self, jobs, deliver, say):
        mode = self.options["mode"]
        records = [execute_job(job) for job in jobs[:1 if mode == "raise" else None]]
        if mode == "skip":
            records, jobs = records[:-1], jobs[:-1]
        for number, (job, record) in enumerate(zip(jobs, records)):
            if mode == "bare":
                record = {"status": "ok"}
            if mode == "swap" and number == 0:
                record = records[1]
            deliver(job, record)
            if mode == "twice":
                deliver(job, record)
            if mode == "changed":
                deliver(job, {**record, "test_acc": 0.0})
        if mode == "raise":
            raise ConnectionError("lost the queue after the first job")


@hookimpl
def register_methods(register):
    register(Doomed)
    register(EnvironmentEcho)


@hookimpl
def register_executors(register):
    register(Sloppy)


def worker_that_answers_at_once(connection, environment, threads):
    """A stand-in pool worker: every job it is sent finishes ok at once."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        job = connection.recv()
        if job is None:
            return
        connection.send(("record", {"trial_id": job.header["trial_id"], "status": "ok", "error": None}))


def worker_that_finishes_t1_and_ignores_stops_on_t2(connection, environment, threads):
    """A stand-in pool worker: job T1 finishes ok at once; on T2 it ignores the host's stop and never answers."""
    import signal
    import time

    from noprop_bench.run.interrupts import STOP_SIGNAL

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(STOP_SIGNAL, signal.SIG_IGN)
    while True:
        job = connection.recv()
        if job is None:
            return
        if job.header["trial_id"] == "T2":
            time.sleep(60)
        connection.send(("record", {"trial_id": job.header["trial_id"], "status": "ok", "error": None}))


def send_whether_sigterm_has_its_default(connection):
    """A process started beside the pool's workers (from its fork server, where there is one): does it have
    SIGTERM's default, even once it has imported the module that makes the fork server ignore SIGTERM?"""
    import signal

    import noprop_bench_plugins.executors.fork_server  # noqa: F401

    connection.send(signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)
