"""Executors: who runs the trials of a command, and where.

The host turns a command into independent :class:`TrialJob` objects (plain data, so they can be pickled
to another process or machine) and hands them to an executor plugin. Whatever the executor, each job
runs through :func:`execute_job`, and every record comes back to the host, which alone writes
``trials.jsonl``. An executor never loses a record: a trial whose worker died comes back as a ``failed``
record saying why (:func:`failed_record`).
"""

import os
import platform
import sys
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch

from .errors import UsageError
from .method import coerce_value, reject_unknown_names
from .results import FINISHED_STATUSES, TrialStore

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
        return f"{self.header['row_label']} seed {self.header['seed']}"


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


def cpu_count() -> int:
    """Cores this process may use (the scheduler's affinity mask where there is one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def worker_identity() -> Dict[str, Any]:
    """Where a trial ran: host, process, and the scheduler's job id when there is one."""
    identity = {"host": platform.node(), "pid": os.getpid()}
    for variable, key in (("SLURM_JOB_ID", "slurm_job_id"), ("SLURM_ARRAY_TASK_ID", "slurm_array_task_id"),
                          ("CUDA_VISIBLE_DEVICES", "cuda_visible_devices")):
        if os.environ.get(variable):
            identity[key] = os.environ[variable]
    return identity


def failed_record(job: TrialJob, cause: str, status: str = "failed") -> Dict[str, Any]:
    """The record of a trial that produced none itself (its worker died, or it was never run)."""
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return {**job.header, "status": status, "error": cause, "executor": job.executor,
            "finished_at": now, "curve": [], "steps": 0, "samples": 0}


@dataclass
class WorkerCache:
    """What a process keeps between the trials it runs: the plugin registry and the last dataset loaded."""

    registry_key: Any = None
    registry: Any = None
    data_key: Any = None
    data: Any = None

    def registry_for(self, job: TrialJob):
        from .plugins import load_plugins

        for path in job.plugin_paths:
            if path not in sys.path:
                sys.path.insert(0, path)
        if self.registry_key != job.plugins:
            self.registry, self.registry_key = load_plugins(list(job.plugins)), job.plugins
        return self.registry

    def data_for(self, job: TrialJob, registry, device: torch.device, say: Say):
        from .runner import RunData
        from .specs import parse_dataset_spec

        key = (job.spec["dataset"], job.data_root, job.download, str(device), job.spec["val_split"], job.plugins)
        if self.data_key != key:
            self.data, self.data_key = None, None  # free the previous dataset before loading the next
            name, argument = parse_dataset_spec(job.spec["dataset"])
            dataset = registry.dataset(name)(argument, root=job.data_root, download=job.download)
            say(f"loading {job.spec['dataset']} ...")
            data = RunData.load(dataset, device, val_split=job.spec["val_split"])
            say(f"{len(data.train)} train / {len(data.test)} test images in {data.load_seconds:.1f}s")
            self.data, self.data_key = data, key
        return self.data


_process_cache = WorkerCache()  # a worker process's cache, reused by every job it runs


def rebuild_spec(job: TrialJob, registry):
    """The :class:`~noprop_bench.runner.TrialSpec` a job describes, resolved against this process's plugins."""
    from .budget import Budget
    from .runner import TrialSpec

    fields = dict(job.spec)
    fields["method"] = registry.method(fields["method"])
    fields["budget"] = Budget.parse(fields["budget"])
    fields["device"] = torch.device(fields["device"])
    return TrialSpec(**fields)


def execute_job(job: TrialJob, progress: Optional[Say] = None, raise_usage_errors: bool = False,
                cache: Optional[WorkerCache] = None) -> Dict[str, Any]:
    """Run one trial in this process and return its record; never raises unless asked to for bad input.

    Worker processes call this and keep plugins and data in the process-wide cache. The in-process
    ``local`` executor passes a cache of its own run and ``raise_usage_errors=True``, so bad input stops
    the command with exit status 2.
    """
    from .runner import run_trial

    say = progress or (lambda message: print(message, file=sys.stderr, flush=True))
    cache = cache or _process_cache
    if job.threads:
        torch.set_num_threads(job.threads)
    try:
        registry = cache.registry_for(job)
        spec = rebuild_spec(job, registry)
        if spec.trial_id != job.trial_id:
            return failed_record(job, f"this worker computes trial id {spec.trial_id}, not {job.trial_id}: its "
                                      f"plugins or their defaults differ from the host's")
        data = cache.data_for(job, registry, spec.device, say)
        record = run_trial(spec, data, progress=say)
    except UsageError as error:
        if raise_usage_errors:
            raise
        return failed_record(job, f"bad input: {error}")
    except KeyboardInterrupt:
        raise
    except Exception as error:  # loading plugins or data failed: the trial failed, the worker goes on
        record = failed_record(job, f"{type(error).__name__}: {error}")
        record["traceback"] = traceback.format_exc(limit=8)
        return record
    record["executor"] = job.executor
    record["worker"] = worker_identity()
    if job.record_copy_dir and record["status"] in FINISHED_STATUSES:
        try:
            TrialStore(job.record_copy_dir).write_record_file(record)
        except OSError as error:  # the host still gets the record; only the copy is missing
            say(f"warning: could not leave a copy of the record in {job.record_copy_dir}: {error}")
    return record


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

    def run(self, jobs: List[TrialJob], deliver: Deliver, say: Say) -> None:
        """Run every job, calling ``deliver(job, record)`` in the host process once per job.

        A delivered record that says the trial was interrupted stops the run (:func:`stop_if_interrupted`).
        On ``KeyboardInterrupt`` stop the workers, deliver an ``interrupted`` record for each job that had
        not finished (after delivering those that had), and re-raise.
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
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise UsageError(f"--executor {executor} needs {module}, which is not installed here ({error}); "
                         f"install it with: pip install 'noprop-bench[{extra}]'") from None


def interrupted(job: TrialJob) -> Dict[str, Any]:
    return failed_record(job, "interrupted by the user", status="interrupted")


def stop_if_interrupted(record: Dict[str, Any]) -> None:
    """A trial that saw Ctrl-C itself (its worker shares the terminal) stops the whole run."""
    if record.get("status") == "interrupted":
        raise KeyboardInterrupt


@dataclass
class Progress:
    """Counts delivered records for the host's ``finished k/N`` lines."""

    total: int
    done: int = 0

    def line(self, job: TrialJob, record: Dict[str, Any]) -> str:
        self.done += 1
        status = record.get("status")
        result = f"ok, test acc {record['test_acc']:.2f}%" if status == "ok" else f"{status}: {record.get('error')}"
        where = (record.get("worker") or {}).get("host")
        return f"finished {self.done}/{self.total}: {job.describe()}: {result}" + (f" (on {where})" if where else "")
