"""The ``ray`` executor: one Ray task per trial, with its CPU and GPU needs declared to Ray's scheduler.

``ray[address=auto]`` joins a running cluster (``ray start --head`` ...); without ``address`` a Ray
instance is started on this machine for the run and stopped after it. A task is never retried: a trial
whose worker dies is recorded as failed with Ray's reason. On Ctrl-C each running task is cancelled
gently: Ray interrupts it as a SIGINT would, its trial stops and is returned ``interrupted`` with the steps
and checkpoints it reached.
"""

import signal
import threading
import time
from typing import Any, Dict, List

from noprop_bench import UsageError, hookimpl
from noprop_bench.executor import (ClusterExecutor, TrialJob, ctrl_c_held, execute_job, failed_record, forget_pending_stop,
                                   interrupted, note_sigterm, require_engine, stop_cause, stop_if_interrupted,
                                   stop_trial_on)


class RayExecutor(ClusterExecutor):
    """One Ray task per trial: ``cpus`` CPUs (as torch threads) and ``gpus`` GPUs each."""

    name = "ray"
    description = "Ray: one task per trial with declared CPUs/GPUs; address=auto joins a cluster, none starts one here"
    extra = "ray"
    engine = "ray"
    gpu_option = "gpus"
    defaults = {"address": "", "cpus": 1, "gpus": 0, "namespace": "noprop-bench"}

    def __init__(self, spec_text: str = "", **options):
        super().__init__(spec_text, **options)
        if self.options["cpus"] < 1 or self.options["gpus"] < 0:
            raise UsageError(f"--executor {self.spec_text}: cpus must be at least 1 and gpus at least 0")

    def threads_per_trial(self, requested):
        return requested or self.options["cpus"]

    def _connect(self, ray) -> bool:
        """Start or join Ray; True when this run started it (and so stops it)."""
        if ray.is_initialized():
            return False
        sigterm = signal.getsignal(signal.SIGTERM)
        try:
            ray.init(address=self.options["address"] or None, namespace=self.options["namespace"],
                     include_dashboard=False, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise UsageError(f"--executor {self.spec_text}: cannot start or join Ray: {error}") from None
        except SystemExit:  # a SIGTERM while Ray started, taken by the handler ray.init had put in
            note_sigterm()
            if ray.is_initialized():
                ray.shutdown()
            raise KeyboardInterrupt from None
        finally:
            # ray.init makes SIGTERM exit the process at once; the host's handler stops the run as Ctrl-C does
            if sigterm is not None and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, sigterm)
        return True

    def _check_resources(self, ray, started_here: bool, say) -> None:
        """A trial that needs more than the cluster has would wait forever: refuse it on a cluster started
        here; warn on one joined (an autoscaler may still add nodes)."""
        resources = ray.cluster_resources()
        say(f"ray: {resources.get('CPU', 0):g} CPU(s), {resources.get('GPU', 0):g} GPU(s) in the cluster; "
            f"{self.options['cpus']} CPU(s), {self.options['gpus']} GPU(s) per trial")
        short = [f"{self.options[key]} {name}(s) per trial but the cluster has {resources.get(name, 0):g}"
                 for key, name in (("cpus", "CPU"), ("gpus", "GPU")) if self.options[key] > resources.get(name, 0)]
        if short and started_here:
            ray.shutdown()
            raise UsageError(f"--executor {self.spec_text}: " + "; ".join(short))
        for line in short:
            say(f"warning: {line}; the trials wait until the cluster grows")

    def run(self, jobs: List[TrialJob], deliver, say) -> None:
        ray = require_engine(self.engine, self.spec_text, self.extra)
        started_here = self._connect(ray)
        try:
            self._check_resources(ray, started_here, say)
            task = ray.remote(run_task).options(num_cpus=self.options["cpus"], num_gpus=self.options["gpus"],
                                                max_retries=0, name="noprop-bench-trial")
            pending = {task.remote(job): job for job in jobs}
            try:
                while pending:
                    ready, _ = ray.wait(list(pending), num_returns=1)
                    for reference in ready:
                        with ctrl_c_held():  # dropped from pending only once delivered
                            job = pending.pop(reference)
                            record = self._result(ray, reference, job)
                            deliver(job, record)
                        stop_if_interrupted(record)
            except KeyboardInterrupt:
                self._stop(ray, pending, deliver, say)
                raise
        finally:
            if started_here and ray.is_initialized():
                ray.shutdown()

    stop_grace_seconds = 10.0  # how long the host waits for cancelled tasks to return what they measured

    def _stop(self, ray, pending: Dict[Any, TrialJob], deliver, say) -> None:
        """After Ctrl-C: keep the results that arrived; cancel the other tasks gently (a running one stops
        its trial and returns it ``interrupted``, with what it measured; a queued one never starts); wait up
        to ``stop_grace_seconds``, or until a second Ctrl-C, for those results; then cancel what is left
        by force and record it as interrupted."""
        try:
            self._keep_ready(ray, pending, deliver, timeout=0)
            for reference in pending:
                ray.cancel(reference, force=False)
            if pending:
                say(f"cancelled {len(pending)} Ray task(s) still queued or running: waiting up to "
                    f"{self.stop_grace_seconds:g}s for what they measured (Ctrl-C again to stop waiting)")
            deadline = time.monotonic() + self.stop_grace_seconds
            while pending and time.monotonic() < deadline:
                self._keep_ready(ray, pending, deliver, timeout=min(0.5, max(0.0, deadline - time.monotonic())))
            self._keep_ready(ray, pending, deliver, timeout=0)  # what arrived during the last wait
        except KeyboardInterrupt:  # a second Ctrl-C: no more waiting
            pass
        finally:
            with ctrl_c_held():  # a further Ctrl-C must not skip a job's record
                for reference, job in pending.items():
                    ray.cancel(reference, force=True)
                    deliver(job, interrupted(job))

    def _keep_ready(self, ray, pending: Dict[Any, TrialJob], deliver, timeout: float) -> None:
        """Deliver (and drop from ``pending``) every task that has ended: its record, or ``interrupted`` for
        one cancelled before it began; an interrupted trial's record names what stopped the run, as the
        host knows it."""
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=timeout) if pending else ([], [])
        for reference in ready:
            with ctrl_c_held():  # a job is dropped from pending only once its record is delivered
                job = pending.pop(reference)
                record = self._result(ray, reference, job)
                if record.get("status") == "interrupted":  # only ever by this Ctrl-C: the host's cause
                    record["error"] = stop_cause()
                deliver(job, record)

    @staticmethod
    def _result(ray, reference, job: TrialJob):
        try:
            return ray.get(reference)
        except ray.exceptions.TaskCancelledError:  # cancelled while it waited for a worker
            return interrupted(job)
        except Exception as error:  # the worker died or the task failed: only this trial
            first_lines = " ".join(str(error).strip().splitlines()[:3])
            return failed_record(job, f"Ray task returned no result: {type(error).__name__}: {first_lines}")


def run_task(job: TrialJob) -> Dict[str, Any]:
    """What a Ray task runs: its trial, which a gentle ``ray.cancel`` (delivered to the task as a SIGINT)
    stops as Ctrl-C stops a trial in the host process, so the record keeps the steps and checkpoints it
    reached.

    The handler stays for the worker process's life: a cancel that lands after the trial ended, while Ray
    stores the result, only notes a stop (a ``KeyboardInterrupt`` there would replace the record with
    ``TaskCancelledError``), and the worker's next task forgets that note before its trial begins."""
    if threading.current_thread() is threading.main_thread():  # elsewhere no handler can be set
        stop_trial_on(signal.SIGINT)
        forget_pending_stop()
    return execute_job(job)


@hookimpl
def register_executors(register):
    register(RayExecutor)
