"""The ``ray`` executor: one Ray task per trial, with its CPU and GPU needs declared to Ray's scheduler.

``ray[address=auto]`` joins a running cluster (``ray start --head`` ...); without ``address`` a Ray
instance is started on this machine for the run and stopped after it. A task is never retried: a trial
whose worker dies is recorded as failed with Ray's reason.
"""

from typing import List

from noprop_bench import UsageError, hookimpl
from noprop_bench.executor import ClusterExecutor, TrialJob, execute_job, failed_record, interrupted, require_engine


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

    def run(self, jobs: List[TrialJob], deliver, say) -> None:
        ray = require_engine(self.engine, self.spec_text, self.extra)
        started_here = not ray.is_initialized()
        if started_here:
            address = self.options["address"] or None
            ray.init(address=address, namespace=self.options["namespace"], include_dashboard=False,
                     log_to_driver=True)
        resources = ray.cluster_resources()
        say(f"ray: {resources.get('CPU', 0):g} CPU(s), {resources.get('GPU', 0):g} GPU(s) in the cluster; "
            f"{self.options['cpus']} CPU(s), {self.options['gpus']} GPU(s) per trial")
        task = ray.remote(execute_job).options(num_cpus=self.options["cpus"], num_gpus=self.options["gpus"],
                                               max_retries=0, name="noprop-bench-trial")
        pending = {task.remote(job): job for job in jobs}
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for reference in ready:
                    job = pending.pop(reference)
                    try:
                        record = ray.get(reference)
                    except Exception as error:  # the worker died or the task failed: only this trial
                        first_lines = " ".join(str(error).strip().splitlines()[:3])
                        record = failed_record(job, f"Ray task returned no result: {type(error).__name__}: "
                                                    f"{first_lines}")
                    deliver(job, record)
        except KeyboardInterrupt:
            for reference, job in pending.items():
                ray.cancel(reference, force=True)
                deliver(job, interrupted(job))
            raise
        finally:
            if started_here:
                ray.shutdown()


@hookimpl
def register_executors(register):
    register(RayExecutor)
