"""noprop-bench: NoProp against back-propagation and adjoint neural ODEs, under equal training budgets."""

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# The plugin contract and the results API load on first use: importing the package costs nothing until a
# name is asked for, so the command line can catch Ctrl-C while torch (the contract's import) still loads,
# and plugins that import the contract do not pay for pandas and the report modules.
CONTRACT = {"Dataset": "datasets", "Split": "datasets", "UsageError": "errors", "hookimpl": "hookspecs",
            "Method": "method", "Task": "task"}
RESULTS_API = ("load_trials", "load_runs", "load_curves")
__all__ = ["hookimpl", "Method", "Dataset", "Split", "Task", "UsageError", "__version__", *RESULTS_API]

if TYPE_CHECKING:  # what editors and type checkers see
    from .datasets import Dataset, Split
    from .errors import UsageError
    from .hookspecs import hookimpl
    from .method import Method
    from .report.frames import load_curves, load_runs, load_trials  # noqa: F401
    from .task import Task


def __getattr__(name):
    if name in CONTRACT:
        value = getattr(import_module(f".{CONTRACT[name]}", __name__), name)
    elif name in RESULTS_API:
        value = getattr(import_module(".report.frames", __name__), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # looked up once
    return value


def __dir__():
    return sorted(set(globals()) | set(CONTRACT) | set(RESULTS_API))
