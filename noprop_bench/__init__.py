"""noprop-bench: NoProp against back-propagation and adjoint neural ODEs, under equal training budgets."""

from .datasets import Dataset, Split
from .errors import UsageError
from .hookspecs import hookimpl
from .method import Method
from .task import Task

__version__ = "0.1.0"
__all__ = ["hookimpl", "Method", "Dataset", "Split", "Task", "UsageError", "__version__"]
