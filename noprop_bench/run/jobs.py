"""Trial jobs: one trial as plain data, and the records an executor hands back for it.

The host turns a command into independent :class:`TrialJob` objects (plain data, so they can be pickled
to another process or machine) and hands them to an executor plugin. Whatever the executor, each job
runs through :func:`~noprop_bench.run.worker.execute_job`, and every record comes back to the host, which alone writes
``trials.jsonl``. An executor never loses a record: a trial whose worker died comes back as a ``failed``
record saying why (:func:`failed_record`).
"""

import inspect
import os
import platform
import signal
import sys
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..method import settings_suffix
from ..provenance import package_folders
from .budget import Budget
from .interrupts import CTRL_C_CAUSE, sigterm_noted, stop_cause
from .store import FINISHED_STATUSES

Deliver = Callable[["TrialJob", Dict[str, Any]], None]
Say = Callable[[str], None]


@dataclass
class TrialJob:
    """One trial as plain data: the spec's fields, how to load the data, and which plugins to load.

    ``header`` is the part of the record known before the trial runs (see ``runner.trial_header``), so
    the host can record a trial whose worker never reported back.
    """

    header: Dict[str, Any]
    spec: Dict[str, Any]
    data_root: Optional[str]
    download: bool
    plugins: Tuple[str, ...] = ()
    plugin_paths: Tuple[str, ...] = ()
    threads: Optional[int] = None
    executor: str = "local"
    record_copy_dir: Optional[str] = None  # where the worker also leaves its record (a run directory)

    @property
    def trial_id(self) -> str:
        return self.header["trial_id"]

    def describe(self) -> str:
        return f"{trial_label(self.header)} seed {self.header['seed']}"

    @property
    def budget_seconds(self) -> Optional[float]:
        """The seconds of training a seconds budget gives the trial (warm-up, loading and evaluation come on
        top); None for a budget of samples, steps or epochs, whose duration is not known before it runs."""
        budget = Budget.parse(self.spec["budget"])
        return budget.amount if budget.unit == "seconds" else None


def trial_label(record: Dict[str, Any], fallback_defaults: Optional[Dict[str, Any]] = None) -> str:
    """A trial's row label with the parameters that differ from its method's defaults, as in
    ``NoProp-CT (one-hot) [steps=20]``. A record made before the defaults were stored is labelled against
    ``fallback_defaults`` (those another record of its method stated), else by its label alone."""
    params, defaults = record.get("params"), record.get("param_defaults")
    if not isinstance(defaults, dict):
        defaults = fallback_defaults
    if not isinstance(params, dict) or not isinstance(defaults, dict):
        return str(record.get("row_label", record.get("method")))
    return f"{record.get('row_label', record.get('method'))}{settings_suffix(params, defaults)}"


def import_root(module_name: str) -> Optional[str]:
    """The ``sys.path`` entry a loaded module was imported from, so other processes can import it too
    (None for a module without a file, e.g. a namespace package)."""
    module = sys.modules[module_name]
    if not getattr(module, "__file__", None):
        return None
    path = os.path.abspath(module.__file__)
    depth = module_name.count(".") + (1 if os.path.basename(path) == "__init__.py" else 0)
    root = os.path.dirname(path)
    for _ in range(depth):
        root = os.path.dirname(root)
    return root


def threads_beyond_cores(threads: Optional[int], effect: str) -> str:
    """A warning when ``--threads`` asks for more torch threads than this process has cores ("" if not): the
    threads then wait for cores, with ``effect`` (what that costs the command)."""
    if not threads or threads <= cpu_count():
        return ""
    return (f"--threads {threads} is more than the {cpu_count()} CPU core(s) this process may use: the threads "
            f"wait for cores, {effect}")


def cpu_count() -> int:
    """Cores this process may use (the scheduler's affinity mask where there is one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def visible_gpus() -> List[str]:
    """The GPU ids this process may hand out to workers, as ``CUDA_VISIBLE_DEVICES`` names them."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [gpu.strip() for gpu in listed.split(",") if gpu.strip()]
    import torch

    return [str(index) for index in range(torch.cuda.device_count())]


def describe_exit(exitcode: Optional[int]) -> str:
    """How a worker process ended, from its exit code (negative: the signal that killed it)."""
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by signal {-exitcode} ({signal.Signals(-exitcode).name})"
        except ValueError:  # a real-time signal, which has no name
            return f"killed by signal {-exitcode}"
    return f"exit status {exitcode}"


def worker_identity() -> Dict[str, Any]:
    """Where a trial ran: host, process, and the scheduler's job id when there is one."""
    identity = {"host": platform.node(), "pid": os.getpid()}
    for variable, key in (("SLURM_JOB_ID", "slurm_job_id"), ("SLURM_ARRAY_JOB_ID", "slurm_array_job_id"),
                          ("SLURM_ARRAY_TASK_ID", "slurm_array_task_id"),
                          ("CUDA_VISIBLE_DEVICES", "cuda_visible_devices")):
        if os.environ.get(variable):
            identity[key] = os.environ[variable]
    return identity


def failed_record(job: TrialJob, cause: str, status: str = "failed") -> Dict[str, Any]:
    """The record of a trial that produced none itself (its worker died, or it was never run)."""
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return {**job.header, "status": status, "error": cause, "executor": job.executor,
            "finished_at": now, "curve": [], "steps": 0, "samples": 0}


TRACEBACK_FRAMES = 12  # the innermost ones: where the error was raised, not how the harness got there


def note_exception(record: Dict[str, Any], error: BaseException, code_of: Optional[type] = None) -> None:
    """Store how ``error`` ended a trial: the innermost frames of its traceback (``traceback``) and the line
    that raised it (``error_at``): the innermost in the code of ``code_of`` (a method's class: its package, or
    its module where it is a module alone), where there is one, else the innermost of all."""
    record["traceback"] = "".join(traceback.format_exception(type(error), error, error.__traceback__,
                                                             limit=-TRACEBACK_FRAMES))
    frames = traceback.extract_tb(error.__traceback__)
    owns = _code_of(code_of)
    own = [frame for frame in frames if owns(os.path.abspath(frame.filename))]
    if frames:
        frame = (own or frames)[-1]
        record["error_at"] = f"{frame.filename}:{frame.lineno} in {frame.name}"


def _code_of(cls: Optional[type]) -> Callable[[str], bool]:
    """Whether a file is part of the code that defines ``cls``: its top-level package's folder, or its module
    file alone (the folder of a lone module may hold anything, a virtual environment included)."""
    folders = [os.path.abspath(path) + os.sep for path in package_folders(cls.__module__)] if cls is not None else []
    if folders:
        return lambda path: any(path.startswith(folder) for folder in folders)
    try:
        source = os.path.abspath(inspect.getsourcefile(cls)) if cls is not None else None
    except TypeError:  # a class defined where no file holds it
        source = None
    return lambda path: path == source


def interrupted(job: TrialJob) -> Dict[str, Any]:
    return failed_record(job, stop_cause(), status="interrupted")


def stop_if_interrupted(record: Dict[str, Any]) -> None:
    """A trial that saw Ctrl-C itself (its worker shares the terminal), or one interrupted while this host is
    being stopped by a SIGTERM, stops the whole run. One stopped alone (a SIGTERM to its own worker or job,
    its job's time limit) is one interrupted trial: the run goes on, and a rerun tries it again."""
    if record.get("status") == "interrupted" and (record.get("error") == CTRL_C_CAUSE or sigterm_noted()):
        raise KeyboardInterrupt


RECORD_STATUSES = ("ok", "diverged", "failed", "interrupted")


def delivery_problem(job: TrialJob, record: Any) -> Optional[str]:
    """What is wrong with a record an executor delivered for ``job`` (None when nothing is): not a dict, another
    trial's, no known status, or ``ok`` without a test accuracy."""
    if not isinstance(record, dict):
        return f"a {type(record).__name__} instead of the record execute_job returns"
    if record.get("trial_id") != job.trial_id:
        return f"the record of trial {record.get('trial_id')!r}, not of this trial ({job.trial_id})"
    if record.get("status") not in RECORD_STATUSES:
        return f"a record with status {record.get('status')!r} (one of {', '.join(RECORD_STATUSES)} expected)"
    if record["status"] == "ok" and not isinstance(record.get("test_acc"), (int, float)):
        return "an ok record without a test accuracy"
    return None


@dataclass
class Progress:
    """Counts delivered records for the host's ``finished k/N`` lines (``failed k/N`` and ``interrupted k/N`` for
    trials a rerun tries again)."""

    total: int
    done: int = 0

    def line(self, job: TrialJob, record: Dict[str, Any]) -> str:
        self.done += 1
        status = record.get("status")
        where = (record.get("worker") or {}).get("host")
        on = f" (on {where})" if where else ""
        if status == "ok":
            return f"finished {self.done}/{self.total}: {job.describe()}: ok, test acc {record['test_acc']:.2f}%{on}"
        if status in FINISHED_STATUSES:
            return f"finished {self.done}/{self.total}: {job.describe()}: {status}: {record.get('error')}{on}"
        return (f"{status} {self.done}/{self.total}: {job.describe()}: {record.get('error')}{on}; "
                "a run resumed in the same --out tries it again")
