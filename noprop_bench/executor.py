"""The names an executor plugin uses, in one public module: ``from noprop_bench.executor import ...``.

The pieces live where the trial run is organised (:mod:`noprop_bench.run`); this module gathers them so
executor plugins have one stable import path.
"""

from .run.executor_base import ClusterExecutor, Executor, require_engine
from .run.jobs import (Deliver, Progress, Say, TrialJob, cpu_count, failed_record, import_root, interrupted,
                       stop_if_interrupted, worker_identity)
from .run.worker import WorkerCache, execute_job, rebuild_spec

__all__ = ["ClusterExecutor", "Deliver", "Executor", "Progress", "Say", "TrialJob", "WorkerCache", "cpu_count",
           "execute_job", "failed_record", "import_root", "interrupted", "rebuild_spec", "require_engine",
           "stop_if_interrupted", "worker_identity"]
