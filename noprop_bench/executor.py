"""The names an executor plugin uses, in one public module: ``from noprop_bench.executor import ...``.

The pieces live where the trial run is organised (:mod:`noprop_bench.run`); this module gathers them so
executor plugins have one stable import path.
"""

from .run.executor_base import ClusterExecutor, Executor, require_engine
from .run.interrupts import (STOP_SIGNAL, ctrl_c_held, forget_pending_stop, note_sigterm, note_time_limit, signal_held,
                             stop_cause, stop_trial, stop_trial_on)
from .run.jobs import (Deliver, Progress, Say, TrialJob, cpu_count, describe_exit, failed_record, import_root,
                       interrupted, stop_if_interrupted, visible_gpus, worker_identity)
from .run.worker import WorkerCache, execute_job, rebuild_spec

__all__ = ["ClusterExecutor", "Deliver", "Executor", "Progress", "STOP_SIGNAL", "Say", "TrialJob", "WorkerCache",
           "cpu_count", "ctrl_c_held", "describe_exit", "execute_job", "failed_record", "forget_pending_stop",
           "import_root", "interrupted", "note_sigterm", "note_time_limit", "rebuild_spec", "require_engine",
           "signal_held", "stop_cause", "stop_if_interrupted", "stop_trial", "stop_trial_on", "visible_gpus",
           "worker_identity"]
