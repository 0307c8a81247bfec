"""The ``submitit`` executor: one SLURM job per trial, submitted as one job array through ``submitit``.

``submitit[partition=gpu,gpus_per_node=1,timeout_min=600]`` submits to SLURM (the host process waits
and writes ``trials.jsonl`` as jobs finish; keep it alive, e.g. in tmux or its own small job).
``cluster=local`` runs the same jobs as local processes through submitit's ``LocalExecutor``, without
SLURM. Job logs and pickles go to ``OUT/submitit/``.
"""

import dataclasses
import time
from pathlib import Path
from typing import Any, Dict, List

from noprop_bench import UsageError, hookimpl
from noprop_bench.executor import ClusterExecutor, TrialJob, execute_job, failed_record, interrupted, require_engine

# our option -> submitit's parameter; empty or 0 values are not passed, so submitit's defaults apply
SLURM_OPTIONS = {"partition": "slurm_partition", "account": "slurm_account", "qos": "slurm_qos",
                 "constraint": "slurm_constraint", "array_parallelism": "slurm_array_parallelism",
                 "mem_gb": "mem_gb", "cpus_per_task": "cpus_per_task"}
POLL_SECONDS = 2.0


class SubmititExecutor(ClusterExecutor):
    """One SLURM job per trial (a job array), or local processes with ``cluster=local``."""

    name = "submitit"
    description = "SLURM through submitit: one job per trial, as a job array (cluster=local runs them here)"
    extra = "slurm"
    engine = "submitit"
    gpu_option = "gpus_per_node"
    defaults = {"cluster": "auto", "partition": "", "gpus_per_node": 0, "cpus_per_task": 0, "mem_gb": 0,
                "timeout_min": 720, "array_parallelism": 0, "account": "", "qos": "", "constraint": "",
                "folder": ""}

    def __init__(self, spec_text: str = "", **options):
        super().__init__(spec_text, **options)
        if self.options["cluster"] not in ("auto", "slurm", "local", "debug"):
            raise UsageError(f"--executor {self.spec_text}: cluster must be auto, slurm, local or debug")

    def threads_per_trial(self, requested):
        return requested or self.options["cpus_per_task"] or None

    def _parameters(self) -> Dict[str, Any]:
        options = self.options
        parameters = {"name": "noprop-bench", "timeout_min": options["timeout_min"],
                      "gpus_per_node": options["gpus_per_node"], "tasks_per_node": 1, "nodes": 1}
        for ours, theirs in SLURM_OPTIONS.items():
            if options[ours]:
                parameters[theirs] = options[ours]
        return parameters

    def _engine(self, folder: str):
        submitit = require_engine(self.engine, self.spec_text, self.extra)
        cluster = None if self.options["cluster"] == "auto" else self.options["cluster"]
        executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
        try:
            executor.update_parameters(**self._parameters())
        except (ValueError, TypeError) as error:
            raise UsageError(f"--executor {self.spec_text}: {error}") from None
        return executor

    def run(self, jobs: List[TrialJob], deliver, say) -> None:
        out_dir = str(Path(self.out_dir).resolve())  # jobs may start in another directory, on another node
        folder = self.options["folder"] or f"{out_dir}/submitit/%j"
        engine = self._engine(folder)
        # each job also leaves its record in the run directory, so a trial that finishes after this host
        # process is gone (a lost login session) is merged by the next run instead of being trained again
        copies = [dataclasses.replace(job, record_copy_dir=out_dir) for job in jobs]
        submitted = engine.map_array(execute_job, copies)
        say(f"submitted {len(submitted)} trial(s) to {engine.cluster} "
            f"(job ids {submitted[0].job_id} ...); logs in {folder.replace('%j', '<job id>')}")
        pending = list(zip(jobs, submitted))
        try:
            while pending:
                for job, handle in list(pending):
                    if handle.done():
                        pending.remove((job, handle))
                        deliver(job, self._result(job, handle))
                if pending:
                    time.sleep(POLL_SECONDS)
        except KeyboardInterrupt:
            for job, handle in pending:
                handle.cancel(check=False)
                deliver(job, interrupted(job))
            say(f"cancelled {len(pending)} job(s) still queued or running")
            raise

    @staticmethod
    def _result(job: TrialJob, handle) -> Dict[str, Any]:
        try:
            return handle.result()
        except Exception as error:  # the job died, timed out or was cancelled: only this trial is lost
            first_lines = " ".join(str(error).strip().splitlines()[:3])
            return failed_record(job, f"job {handle.job_id} ({handle.state}) returned no result: "
                                      f"{type(error).__name__}: {first_lines}")


@hookimpl
def register_executors(register):
    register(SubmititExecutor)
