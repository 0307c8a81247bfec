"""The executor contract: the base class an executor plugin subclasses, and the cluster variant."""

import importlib
from typing import Any, Dict, List, Mapping, Optional

import torch

from ..errors import UsageError
from ..method import coerce_value, reject_unknown_names
from .jobs import Deliver, Say, TrialJob


class Executor:
    """Runs a list of trial jobs somewhere and hands each record back to the host.

    Subclasses set ``name`` (as in ``--executor NAME[key=value,...]``), ``defaults`` (every accepted
    option with its default value, which fixes its type), ``extra`` (the pip extra that installs their
    engine, if any) and implement :meth:`run`. ``self.options`` holds the resolved options.
    """

    name: str = ""
    description: str = ""
    extra: Optional[str] = None
    defaults: Dict[str, Any] = {}

    def __init__(self, spec_text: str = "", **options):
        self.options = {**self.defaults, **options}
        self.spec_text = spec_text or self.name
        self.out_dir = "."  # the run's output directory, set by the host before run()

    @classmethod
    def resolve_options(cls, given: Mapping[str, str]) -> Dict[str, Any]:
        reject_unknown_names(given, cls.defaults, f"executor {cls.name!r}", "option")
        try:
            return {key: coerce_value(key, value, cls.defaults[key]) for key, value in given.items()}
        except UsageError as error:
            raise UsageError(f"--executor {cls.name}: {error}") from None

    def check_available(self) -> None:
        """Raise :class:`UsageError` naming the extra to install when the engine is missing."""

    def device_type(self, requested: str) -> str:
        """The device type the trials will train on, for ``--device auto|cpu|cuda`` (fixes the trial ids)."""
        if requested == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if requested == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available here; use --device cpu or auto")
        return requested

    def threads_per_trial(self, requested: Optional[int]) -> Optional[int]:
        """CPU threads each trial gets; ``None`` leaves torch's choice."""
        return requested

    def check_jobs(self, jobs: List[TrialJob], say: Say) -> None:
        """Refuse with a :class:`UsageError`, before the run directory is made or anything trains, jobs this
        executor could never finish (a budget longer than a job's time limit, say); warn through ``say``."""

    def run(self, jobs: List[TrialJob], deliver: Deliver, say: Say) -> None:
        """Run every job, calling ``deliver(job, record)`` in the host process once per job.

        A delivered record of a trial interrupted by Ctrl-C stops the run (:func:`stop_if_interrupted`: one
        stopped alone, by a SIGTERM to its worker or its job's time limit, does not).
        On ``KeyboardInterrupt`` stop the workers, deliver each job that had begun (its record if it has one,
        else :func:`interrupted`), and re-raise; a job that never began may be left undelivered (the host
        lists it as not run) or delivered as interrupted.
        """
        raise NotImplementedError


class ClusterExecutor(Executor):
    """An executor whose trials run where an engine places them: the device follows the GPUs requested.

    Subclasses set ``engine`` (the module to import) and ``gpu_option`` (their option for GPUs per trial).
    """

    engine: str = ""
    gpu_option: str = "gpus"

    def check_available(self) -> None:
        require_engine(self.engine, self.spec_text, self.extra)

    def device_type(self, requested: str) -> str:
        """CUDA when GPUs are requested; ``--device cuda`` requests one per trial if none was, and
        ``--device cpu`` requests none."""
        if requested == "cuda" and self.options[self.gpu_option] == 0:
            self.options[self.gpu_option] = 1
        if requested == "cpu":
            self.options[self.gpu_option] = 0
        return "cuda" if self.options[self.gpu_option] > 0 else "cpu"


def require_engine(module: str, executor: str, extra: str):
    """Import an optional engine, or explain which extra installs it (exit status 2)."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise UsageError(f"--executor {executor} needs {module}, which is not installed here ({error}); "
                         f"install it with: pip install 'noprop-bench[{extra}]'") from None


