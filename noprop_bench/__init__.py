"""noprop-bench: NoProp against back-propagation and adjoint neural ODEs, under equal training budgets."""

from .datasets import Dataset, Split
from .errors import UsageError
from .hookspecs import hookimpl
from .method import Method
from .task import Task

__version__ = "0.1.0"
RESULTS_API = ("load_trials", "load_runs", "load_curves")
__all__ = ["hookimpl", "Method", "Dataset", "Split", "Task", "UsageError", "__version__", *RESULTS_API]


def __getattr__(name):
    # the results API (pandas DataFrames) loads on first use, so plugins importing the contract do not pay
    # for pandas and the report modules
    if name in RESULTS_API:
        from .report import frames

        return getattr(frames, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(RESULTS_API))
