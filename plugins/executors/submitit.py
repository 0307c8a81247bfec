"""The ``submitit`` executor: one SLURM job per trial, submitted as one job array through ``submitit``.

``submitit[partition=gpu,gpus_per_node=1,timeout_min=600]`` submits to SLURM (the host process waits
and writes ``trials.jsonl`` as jobs finish; keep it alive, e.g. in tmux or its own small job).
Without SLURM it refuses rather than quietly running everything here; ``cluster=local`` runs the same
jobs as processes on this machine through submitit's ``LocalExecutor`` (one per core share, or one at a
time on a GPU), the path the tests take. Job logs and pickles go to ``OUT/submitit/``.
"""

import dataclasses
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

from noprop_bench import UsageError, hookimpl
from noprop_bench.executor import (ClusterExecutor, TrialJob, cpu_count, ctrl_c_held, execute_job, failed_record,
                                   interrupted, note_sigterm, note_time_limit, require_engine, stop_cause, stop_if_interrupted,
                                   stop_trial, stop_trial_on)

# our option -> submitit's parameter; empty or 0 values are not passed, so submitit's defaults apply
SLURM_OPTIONS = {"partition": "slurm_partition", "account": "slurm_account", "qos": "slurm_qos",
                 "constraint": "slurm_constraint", "array_parallelism": "slurm_array_parallelism",
                 "mem_gb": "mem_gb", "cpus_per_task": "cpus_per_task", "exclude": "slurm_exclude",
                 "nodelist": "slurm_nodelist"}  # and gres, written out in _parameters
# what a job on this machine (cluster=local) has no use for; setup is left out: the README says local jobs
# run in the host's environment
SLURM_ONLY = ("partition", "account", "qos", "constraint", "gres", "exclude", "nodelist", "array_parallelism",
              "mem_gb")
POLL_SECONDS = 2.0
STOP_POLL_SECONDS = 0.2
ENDED_STATES = {"FINISHED", "COMPLETED"}  # what submitit calls a job whose process ended


class SubmititExecutor(ClusterExecutor):
    """One SLURM job per trial (a job array), or local processes with ``cluster=local``."""

    name = "submitit"
    description = "SLURM through submitit: one job per trial, as a job array (cluster=local runs them here)"
    extra = "slurm"
    engine = "submitit"
    gpu_option = "gpus_per_node"
    defaults = {"cluster": "auto", "partition": "", "gpus_per_node": 0, "cpus_per_task": 0, "mem_gb": 0,
                "timeout_min": 720, "array_parallelism": 0, "account": "", "qos": "", "constraint": "",
                "gres": "", "exclude": "", "nodelist": "", "setup": "", "folder": ""}

    def __init__(self, spec_text: str = "", **options):
        super().__init__(spec_text, **options)
        # submitit's "debug" cluster is left out: it runs jobs inside this process and opens pdb on errors
        if self.options["cluster"] not in ("auto", "slurm", "local"):
            raise UsageError(f"--executor {self.spec_text}: cluster must be auto (SLURM), slurm or local")
        negative = [key for key in ("gpus_per_node", "cpus_per_task", "mem_gb", "array_parallelism")
                    if self.options[key] < 0]
        if negative:
            raise UsageError(f"--executor {self.spec_text}: {', '.join(negative)} must not be negative (0 leaves "
                             f"it to SLURM's default)")
        if any(part.split(":")[0].strip().lower() == "gpu" for part in self.options["gres"].split(";")):
            raise UsageError(f"--executor {self.spec_text}: ask for GPUs with gpus_per_node=N (or --device cuda), "
                             f"and for a GPU type with constraint=TYPE; gres=gpu... would not make the trials use "
                             f"them (gres is for other generic resources)")
        if self.options["timeout_min"] <= 0:
            raise UsageError(f"--executor {self.spec_text}: timeout_min must be a positive number of minutes")

    @property
    def runs_here(self) -> bool:
        """True for submitit's local cluster, which runs the jobs as processes on this machine."""
        return self.options["cluster"] == "local"

    def check_available(self) -> None:
        super().check_available()
        if not self.runs_here and shutil.which("srun") is None:
            raise UsageError(f"--executor {self.spec_text}: no SLURM here (srun is not on PATH); run the command "
                             f"on a SLURM login node, or add cluster=local to run the jobs on this machine")

    def device_type(self, requested: str) -> str:
        device = super().device_type(requested)  # --device cpu asks for no GPU
        if self.runs_here and device == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--executor {self.spec_text}: cluster=local runs the jobs on this machine, which has "
                             f"no CUDA device; use gpus_per_node=0 or --device cpu")
        return device

    def threads_per_trial(self, requested):
        # on this machine the jobs share its cores, one thread each unless told otherwise
        return requested or self.options["cpus_per_task"] or (1 if self.runs_here else None)

    def _slots(self, threads) -> int:
        """How many jobs may run at once: all of them on SLURM, one per core share or one GPU job here."""
        if not self.runs_here:
            return 1 << 30
        if self.options["gpus_per_node"] > 0:
            return 1  # submitit's local cluster would give every job the same first GPU
        return max(1, cpu_count() // (threads or 1))

    def _parameters(self) -> Dict[str, Any]:
        options = self.options
        parameters = {"name": "noprop-bench", "timeout_min": options["timeout_min"],
                      "gpus_per_node": options["gpus_per_node"], "tasks_per_node": 1, "nodes": 1}
        for ours, theirs in SLURM_OPTIONS.items():
            if options[ours]:
                parameters[theirs] = options[ours]
        # several generic resources are given with ';' between them, as ',' separates the options
        gres = ",".join(part.strip() for part in options["gres"].split(";") if part.strip())
        if gres:
            parameters["slurm_gres"] = gres
        # shell lines a SLURM job script runs before the trial (module load, activating an environment),
        # given with ';' between them, as ',' separates the options; local jobs run in this environment
        setup = [line.strip() for line in options["setup"].split(";") if line.strip()]
        if setup and not self.runs_here:
            parameters["slurm_setup"] = setup
        return parameters

    def _engine(self, folder: str):
        submitit = require_engine("submitit", self.spec_text, self.extra)
        cluster = "slurm" if self.options["cluster"] == "auto" else self.options["cluster"]
        try:
            executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
            executor.update_parameters(**self._parameters())
        except (ValueError, TypeError, RuntimeError) as error:
            raise UsageError(f"--executor {self.spec_text}: {error}") from None
        return executor

    def check_jobs(self, jobs: List[TrialJob], say) -> None:
        """Refuse a seconds budget that alone fills a job's ``timeout_min`` (every job would be stopped at its
        limit, and a rerun would only start it again); warn when it leaves under a quarter of the limit for
        loading, warm-up and evaluation. Other budgets' durations are not known before they run. Warn of
        SLURM-only options given to ``cluster=local``."""
        ignored = [key for key in SLURM_ONLY if self.options[key]]
        if self.runs_here and ignored:
            say(f"warning: --executor {self.spec_text}: {', '.join(ignored)} only apply to SLURM jobs; cluster=local "
                f"runs the jobs on this machine without them")
        seconds = max((job.budget_seconds for job in jobs if job.budget_seconds is not None), default=None)
        limit = self.options["timeout_min"] * 60
        if seconds is None or seconds <= 0.75 * limit:
            return
        if seconds >= limit:
            raise UsageError(f"--executor {self.spec_text}: a trial's budget of {seconds:g} s of training alone "
                             f"fills a job's time limit (timeout_min={self.options['timeout_min']}, {limit:g} s), "
                             f"so every job would be stopped before it finished; raise timeout_min")
        say(f"warning: a trial's budget of {seconds:g} s of training leaves {limit - seconds:g} s of a job's time "
            f"limit (timeout_min={self.options['timeout_min']}) for loading, warm-up and evaluation; a job stopped "
            f"at its limit starts again from the beginning when rerun, so raise timeout_min if that is too little")

    def run(self, jobs: List[TrialJob], deliver, say) -> None:
        out_dir = str(Path(self.out_dir).resolve())  # jobs may start in another directory, on another node
        folder = self.options["folder"] or f"{out_dir}/submitit/%j"
        engine = self._engine(folder)
        # each job also leaves its finished record in the run directory, so a trial that finishes after this
        # host process is gone (a lost login session) is merged by the next run instead of trained again
        queue = [(job, dataclasses.replace(job, record_copy_dir=out_dir)) for job in jobs]
        pending = []
        if self.runs_here:
            slots = self._slots(jobs[0].threads)
            say(f"submitit's {engine.cluster} cluster: at most {slots} job(s) at a time on this machine")
        else:
            pending = list(zip(jobs, engine.map_array(run_job, [copy for _, copy in queue])))
            queue = []
            say(f"submitted {len(pending)} trial(s) to {engine.cluster} as job array "
                f"{str(pending[0][1].job_id).split('_')[0]}; logs in {folder.replace('%j', '<job id>')}")
        try:
            while queue or pending:
                while queue and len(pending) < slots:
                    job, copy = queue.pop(0)
                    handle = engine.submit(run_job, copy)
                    # submitit (1.4 to 1.5 at least) waits up to 15 s for a finished job's result file, which a
                    # cluster's shared filesystem may show late; on this machine an ended job has written it or
                    # never will. The attribute is submitit's own (its tests set it likewise).
                    handle._results_timeout_s = 0
                    pending.append((job, handle))
                finished = [(job, handle) for job, handle in pending if handle.done()]
                for job, handle in finished:
                    with ctrl_c_held():  # dropped from pending only once delivered
                        pending.remove((job, handle))
                        record = self._result(job, handle)
                        deliver(job, record)
                    stop_if_interrupted(record)  # local jobs share this terminal: Ctrl-C may reach them first
                if pending and not finished:
                    time.sleep(POLL_SECONDS)
        except KeyboardInterrupt:
            self._stop(pending, deliver, say)
            raise
        finally:
            _remove_template_folder(folder)

    stop_grace_seconds = 10.0  # how long the host waits for cancelled jobs to return what they measured

    def _stop(self, pending: list, deliver, say) -> None:
        """After Ctrl-C: keep the results that arrived; cancel the other jobs, which stop their trials and
        return them ``interrupted``, with the steps and checkpoints they reached (see :func:`run_job`); wait
        up to ``stop_grace_seconds``, or until a second Ctrl-C, for those results; record the rest (a job
        still queued, one killed) as interrupted."""
        try:
            self._keep_arrived(pending, deliver)
            for _, handle in pending:
                handle.cancel(check=False)
            if pending:
                say(f"cancelled {len(pending)} job(s) still queued or running: waiting up to "
                    f"{self.stop_grace_seconds:g}s for what they measured (Ctrl-C again to stop waiting)")
            deadline = time.monotonic() + self.stop_grace_seconds
            while pending and time.monotonic() < deadline:
                time.sleep(STOP_POLL_SECONDS)
                self._keep_arrived(pending, deliver)
        except KeyboardInterrupt:  # a second Ctrl-C: no more waiting
            pass
        finally:
            with ctrl_c_held():  # a further Ctrl-C must not skip a job's record
                for job, _ in pending:
                    deliver(job, interrupted(job))

    def _keep_arrived(self, pending: list, deliver) -> None:
        """Deliver (and drop from ``pending``) every job whose result has been written; an interrupted trial's
        record names what stopped the run, as the host knows it."""
        for job, handle in [entry for entry in pending if entry[1].paths.result_pickle.exists()]:
            with ctrl_c_held():  # a job is dropped from pending only once its record is delivered
                record = self._result(job, handle)
                if record.get("status") == "interrupted":
                    record["error"] = stop_cause()
                pending.remove((job, handle))
                deliver(job, record)

    @staticmethod
    def _result(job: TrialJob, handle) -> Dict[str, Any]:
        try:
            return handle.result()
        except Exception as error:  # the job died, timed out or was cancelled: only this trial is lost
            # submitit's message opens with a banner; its traceback's last line names the exception
            lines = [line.strip() for line in str(error).splitlines() if line.strip().strip("-")]
            cause = " ".join(lines[:1] + lines[-1:]) if len(lines) > 1 else " ".join(lines)
            state = handle.state
            what = f"job {handle.job_id} ({state}) returned no result"
            if state in ENDED_STATES and not handle.paths.result_pickle.exists():
                # the engine saw its process end but not how, and Python wrote nothing (an error would be there)
                what = (f"job {handle.job_id} ended without a result (killed, or crashed outside Python; "
                        f"submitit's state: {state})")
            return failed_record(job, f"{what}: {type(error).__name__}: {cause}; its log: "
                                      f"{handle.paths.stderr}")


def run_job(job: TrialJob) -> Dict[str, Any]:
    """What a submitit job runs: its trial, which a SIGINT (a local job cancelled, Ctrl-C in the terminal it
    shares), a SIGTERM (``scancel``) or the job's time limit stops as Ctrl-C stops a trial in the host
    process: the job then returns the trial ``interrupted``, with the steps and checkpoints it reached,
    rather than dying without a result or failing."""
    stop_trial_on(signal.SIGINT, signal.SIGTERM)
    if os.environ.get("SLURM_JOB_ID") and hasattr(signal, "setitimer"):
        _stop_after_a_sigterm_settles()
    _stop_at_the_time_limit()
    return execute_job(job)


SIGTERM_GRACE_SECONDS = 2.0


def _stop_after_a_sigterm_settles() -> None:
    """SLURM may precede a preemption notice with a SIGTERM: wait ``SIGTERM_GRACE_SECONDS`` before stopping
    the trial, so that submitit can requeue a preempted job (its notice ends the job first); a SIGTERM
    alone (``scancel``, which kills only after KillWait, 30 s by default) then stops the trial."""
    def on_sigterm(signum, frame) -> None:
        signal.setitimer(signal.ITIMER_REAL, SIGTERM_GRACE_SECONDS)

    def on_alarm(signum, frame) -> None:
        note_sigterm()
        stop_trial(signum, frame)

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGTERM, on_sigterm)


def _stop_at_the_time_limit() -> None:
    """submitit signals a job shortly before its time limit (SIGUSR2 by default): a preempted job is requeued,
    as submitit does; a job whose time is up, which submitit would end with an error inside the trial,
    stops its trial instead."""
    try:
        import submitit

        usr_signal = submitit.JobEnvironment._usr_sig()  # what submitit was set to send
    except (ImportError, AttributeError, ValueError):
        usr_signal = getattr(signal, "SIGUSR2", None)
    submitits = signal.getsignal(usr_signal) if usr_signal is not None else None
    if not callable(submitits):
        return

    def on_notice(signum, frame) -> None:
        if hasattr(signal, "setitimer"):
            signal.setitimer(signal.ITIMER_REAL, 0)  # a SIGTERM just before was part of this notice
        try:
            submitits(signum, frame)  # requeues a preempted job (and exits), raises for a job out of time
        except Exception:  # noqa: BLE001 - submitit's "timed-out and not checkpointable"
            note_time_limit()
            stop_trial(signum, frame)

    signal.signal(usr_signal, on_notice)


def _remove_template_folder(folder: str) -> None:
    """submitit creates the folder template itself (a literal ``%j``) besides each job's folder: remove it
    when it is empty."""
    if "%j" in folder:
        try:
            Path(folder).rmdir()
        except OSError:  # not there, or not empty
            pass


@hookimpl
def register_executors(register):
    register(SubmititExecutor)
