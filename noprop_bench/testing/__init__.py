"""Conformance checks a plugin author calls from their own tests, like scikit-learn's ``check_estimator``.

``check_method(MyMethod, **params)``, ``check_dataset(MyDataset, argument=None)`` and
``check_executor(MyExecutor, **options)`` run a plugin through the contract in seconds on the CPU with
tiny synthetic data, and fail with one assertion line per violation, each worded as its fix.
"""

from .datasets import check_dataset
from .executors import check_executor
from .host_sync import HostSyncWarning
from .methods import check_method

__all__ = ["check_method", "check_dataset", "check_executor", "HostSyncWarning"]
