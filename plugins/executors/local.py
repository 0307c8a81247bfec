"""The ``local`` executor: trials in this process, or in N worker processes on this machine.

``local`` runs one trial after another in the host process. ``local[workers=N]`` starts N worker
processes; on CUDA each gets one GPU of its own (``CUDA_VISIBLE_DEVICES``), on the CPU each gets an
equal share of the cores as torch threads, so every trial still spends its budget on a device it does
not share. A worker that dies loses only the trial it held: that trial is recorded as failed with the
cause, and a fresh worker takes its place. At Ctrl-C the host asks each worker to stop its trial and
send what it measured (steps, checkpoints), then stops the workers.
"""

import dataclasses
import multiprocessing
import os
import platform
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from noprop_bench import UsageError, hookimpl
from noprop_bench.executor import (STOP_SIGNAL, Executor, TrialJob, WorkerCache, cpu_count, describe_exit, execute_job,
                                   failed_record, interrupted, signal_held, stop_cause, stop_if_interrupted,
                                   stop_trial_on, visible_gpus)
from noprop_bench.executor import ctrl_c_held as whole_messages  # whole_messages: a message goes whole


# imported once by the fork server the workers fork from: what makes it outlive a SIGTERM to the process group,
# then what every worker imports before its first trial (torch's optimisers import its compiler stack). Not
# pandas: with it comes pyarrow's jemalloc, whose background thread makes a fork risky (known deadlocks). Two
# workers forked from a running server answer their first job in 0.16 s, spawned in 2.3 s (2-core CPU); the
# server's own start costs about what a spawned worker's does. Plugins are imported by each worker afresh.
FORK_SERVER_PRELOAD = ["noprop_bench_plugins.executors.fork_server", "torch", "torch._dynamo",
                       "noprop_bench.executor"]


def _start_method(device: str) -> str:
    """``forkserver`` for CPU workers on Linux: a worker forks from a server process that has imported torch
    but initialised neither CUDA nor OpenMP. Else ``spawn``: on macOS forking is unsafe once system frameworks
    have started (Python spawns there by default), and on CUDA a server that so much as counted the GPUs while
    importing would leave every worker unable to use one. Never a fork of the host, which may have done both."""
    return "forkserver" if sys.platform.startswith("linux") and device == "cpu" else "spawn"


def _worker_main(connection, environment: Dict[str, str], threads: Optional[int]) -> None:
    """A worker process: run the jobs it is sent, one at a time, and send back progress and records. The
    host's :data:`STOP_SIGNAL` stops the trial it trains, which then sends what it measured; so does a SIGTERM
    (one sent to the whole process group reaches the workers as well as the host)."""
    # the host's environment as it is now (a forked worker would have the fork server's, from its start),
    # set before anything initialises CUDA
    os.environ.clear()
    os.environ.update(environment)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the host handles Ctrl-C and stops the workers
    if STOP_SIGNAL is not None:
        stop_trial_on(STOP_SIGNAL, signal.SIGTERM)
    if threads:
        torch.set_num_threads(threads)

    sending = threading.Lock()  # the final evaluation's progress tick sends from a thread of its own

    def send(message) -> None:
        with sending:
            if STOP_SIGNAL is None:
                connection.send(message)
                return
            with signal_held(STOP_SIGNAL):  # a message goes whole
                connection.send(message)

    while True:
        job = connection.recv()
        if job is None:
            return
        send(("record", execute_job(job, progress=lambda message: send(("progress", message)))))


@dataclass
class _Worker:
    number: int
    process: Any
    connection: Any
    job: Optional[TrialJob] = None
    received: List[Any] = field(default_factory=list)  # messages read whole and not yet handled
    delivering: Optional[Dict[str, Any]] = None  # the record being handed to the host's store


class LocalExecutor(Executor):
    """Trials on this machine: in the host process (``workers=0``) or in N worker processes."""

    name = "local"
    description = "this machine: in-process (default), or workers=N processes, one GPU or an equal CPU share each"
    defaults = {"workers": 0}

    def __init__(self, spec_text: str = "", **options):
        super().__init__(spec_text, **options)
        if self.options["workers"] < 0:
            raise UsageError(f"--executor {self.spec_text}: workers must be 0 (in-process) or more")
        self.device = "cpu"

    @property
    def workers(self) -> int:
        return self.options["workers"]

    def device_type(self, requested: str) -> str:
        self.device = super().device_type(requested)
        if self.device == "cuda" and self.workers > 1 and self.workers > len(visible_gpus()):
            raise UsageError(f"--executor {self.spec_text}: {self.workers} workers but {len(visible_gpus())} "
                             f"GPU(s); workers would share a GPU and their clocks would not be fair")
        return self.device

    def threads_per_trial(self, requested: Optional[int]) -> Optional[int]:
        if requested or self.device == "cuda":
            return requested
        if self.workers == 0:  # in this process, with its threads
            return torch.get_num_threads()
        return max(1, cpu_count() // self.workers)

    def run(self, jobs: List[TrialJob], deliver, say) -> None:
        if self.workers == 0:
            self._run_in_process(jobs, deliver, say)
        else:
            warning = self.oversubscription(jobs[0].threads, min(self.workers, len(jobs)))
            if warning:
                say(f"warning: {warning}")
            # a worker also leaves its finished record in the run directory: if this host is killed (it
            # cannot stop its workers then), a trial that still finishes is merged by the next run
            out_dir = str(Path(self.out_dir).resolve())
            jobs = [dataclasses.replace(job, record_copy_dir=out_dir) for job in jobs]
            _Pool(self, jobs[0].threads, say).run(jobs, deliver)

    def oversubscription(self, threads: Optional[int], running: int) -> str:
        """What to warn of when ``running`` CPU workers of ``threads`` threads each want more cores than
        there are: concurrent trials then slow each other down, and a seconds budget buys each less."""
        # one trial's threads beyond the cores are the host's warning (it gives it for every executor here)
        if self.device == "cuda" or not threads or running < 2 or running * threads <= cpu_count():
            return ""
        return (f"{running} workers × {threads} thread(s) on {cpu_count()} CPU core(s): the trials share cores, "
                f"so each runs slower than alone and its samples/s (and what a seconds budget buys) is lower; "
                f"use fewer workers for figures that compare with runs of other executors")

    @staticmethod
    def _run_in_process(jobs: List[TrialJob], deliver, say) -> None:
        cache = WorkerCache()  # the data is loaded once for the whole run, and dropped after it
        first = jobs[0]
        cache.data_for(first, cache.registry_for(first), torch.device(first.spec["device"]), say)  # fail early
        for number, job in enumerate(jobs, 1):
            say(f"[{number}/{len(jobs)}] {job.describe()} on {job.spec['dataset']}")
            record = execute_job(job, progress=say, raise_usage_errors=True, cache=cache)
            deliver(job, record)
            stop_if_interrupted(record)


class _Pool:
    """N long-lived worker processes fed one job at a time; the host is the only writer of results."""

    def __init__(self, executor: LocalExecutor, threads: Optional[int], say):
        self.executor, self.threads, self.say = executor, threads, say
        self.context = multiprocessing.get_context(_start_method(executor.device))
        if self.context.get_start_method() == "forkserver":
            self.context.set_forkserver_preload(FORK_SERVER_PRELOAD)
        self.gpus = visible_gpus() if executor.device == "cuda" else []

    def _start(self, number: int) -> _Worker:
        environment = {**os.environ, **({"CUDA_VISIBLE_DEVICES": self.gpus[number]} if self.gpus else {})}
        host_end, worker_end = self.context.Pipe()
        process = self.context.Process(target=_worker_main, args=(worker_end, environment, self.threads),
                                       name=f"noprop-bench-worker-{number}", daemon=True)
        process.start()
        worker_end.close()
        where = f"GPU {self.gpus[number]}" if self.gpus else f"{self.threads or 'default'} CPU thread(s)"
        self.say(f"worker {number} started (pid {process.pid}, {where})")
        return _Worker(number, process, host_end)

    def run(self, jobs: List[TrialJob], deliver) -> None:
        queue = list(jobs)
        workers = [self._start(n) for n in range(min(self.executor.workers, len(jobs)))]
        try:
            while queue or any(w.job for w in workers):
                for index, worker in enumerate(workers):
                    if worker.job is None and queue and not worker.process.is_alive():
                        workers[index] = worker = self._start(worker.number)  # it died between trials
                    if worker.job is None and queue:
                        worker.job = queue.pop(0)
                        try:
                            with whole_messages():
                                worker.connection.send(worker.job)
                        except OSError:  # it died just now: _collect records the job as failed
                            pass
                        self.say(f"worker {worker.number}: {worker.job.describe()}")
                busy = [w for w in workers if w.job]  # never empty here: a job is queued or running
                wait([w.connection for w in busy] + [w.process.sentinel for w in busy])
                for worker in busy:
                    record = self._collect(worker)
                    if record is not None:
                        worker.delivering = record  # the job is let go once its record is stored
                        deliver(worker.job, record)
                        worker.job, worker.delivering = None, None
                        stop_if_interrupted(record)
        except KeyboardInterrupt:
            self._stop(workers, deliver)
            raise
        finally:
            for worker in workers:
                if worker.process.is_alive():
                    try:
                        worker.connection.send(None)
                    except OSError:
                        pass
            for worker in workers:
                worker.process.join(timeout=10)
                if worker.process.is_alive():
                    worker.process.kill()

    stop_grace_seconds = 10.0  # how long the host waits for workers to send what they measured

    def _stop(self, workers: List[_Worker], deliver) -> None:
        """After Ctrl-C: keep the records that arrived; ask each worker still training to stop and send its
        record (``interrupted``, with the steps and checkpoints it reached); after ``stop_grace_seconds``
        or a second Ctrl-C, kill the workers and record what they held as interrupted."""
        try:
            self._keep_arrived(workers, deliver)
            self._ask_to_stop(workers, deliver)
        except KeyboardInterrupt:  # a second Ctrl-C: no more waiting
            pass
        try:
            self._keep_arrived(workers, deliver)
        except KeyboardInterrupt:
            pass
        finally:
            for worker in workers:
                worker.process.kill()
            for worker in workers:  # one whose record was being stored keeps that record
                if worker.job:
                    deliver(worker.job, worker.delivering or interrupted(worker.job))

    def _keep_arrived(self, workers: List[_Worker], deliver) -> None:
        """Store each record that has arrived, even from a worker that is dead now; one interrupted while
        being stored is stored again (an identical last line is not repeated)."""
        for worker in workers:
            record = (worker.delivering or self._arrived(worker)) if worker.job else None
            if record is not None:
                self._deliver_stopped(worker, record, deliver)

    def _deliver_stopped(self, worker: _Worker, record: Dict[str, Any], deliver) -> None:
        if record.get("status") == "interrupted":
            record["error"] = stop_cause()  # the host knows what stopped the run (Ctrl-C or a SIGTERM)
        worker.delivering = record
        deliver(worker.job, record)
        worker.job, worker.delivering = None, None

    def _ask_to_stop(self, workers: List[_Worker], deliver) -> None:
        busy = [w for w in workers if w.job and w.process.is_alive()]
        if STOP_SIGNAL is None or not busy:
            return
        for worker in busy:
            try:
                os.kill(worker.process.pid, STOP_SIGNAL)
            except ProcessLookupError:
                pass
        self.say(f"stopping {len(busy)} worker(s): waiting up to {self.stop_grace_seconds:g}s for what they "
                 f"measured (Ctrl-C again to stop them now)")
        deadline = time.monotonic() + self.stop_grace_seconds
        while busy and time.monotonic() < deadline:
            wait([w.connection for w in busy] + [w.process.sentinel for w in busy],
                 timeout=max(0.0, deadline - time.monotonic()))
            self._keep_arrived(busy, deliver)
            busy = [w for w in busy if w.job and w.process.is_alive()]

    def _arrived(self, worker: _Worker) -> Optional[Dict[str, Any]]:
        """The record the worker has sent, if it has (read already, or still in the pipe), alive or not;
        its progress messages before it are printed."""
        try:
            while worker.received or worker.connection.poll():
                if not worker.received:
                    with whole_messages():  # a Ctrl-C held here is raised with the message kept
                        worker.received.append(worker.connection.recv())
                kind, payload = worker.received[0]
                if kind == "record":
                    return worker.received.pop(0)[1]
                worker.received.pop(0)
                self.say(f"  [worker {worker.number}] {payload}")
        except (EOFError, OSError):
            pass
        return None

    def _collect(self, worker: _Worker) -> Optional[Dict[str, Any]]:
        """The worker's record if it finished its trial; a failed record if it died; else None."""
        record = self._arrived(worker)
        if record is not None or worker.process.is_alive():
            return record
        worker.process.join()
        cause = (f"worker process {worker.process.pid} died while running this trial: "
                 f"{describe_exit(worker.process.exitcode)}")
        self.say(f"worker {worker.number}: {cause}")
        record = failed_record(worker.job, cause)
        record["worker"] = {"host": platform.node(), "pid": worker.process.pid,
                            **({"cuda_visible_devices": self.gpus[worker.number]} if self.gpus else {})}
        return record


@hookimpl
def register_executors(register):
    register(LocalExecutor)
