"""Running one trial job in this process: plugins and data cached between jobs, and a record always."""

import sys
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from ..errors import UsageError
from ..plugins import PluginWarning, load_plugins
from ..specs import parse_dataset_spec
from .budget import Budget
from .jobs import Say, TrialJob, failed_record, note_exception, worker_identity
from .runner import RunData, TrialSpec, run_trial
from .store import FINISHED_STATUSES, TrialStore


@dataclass
class WorkerCache:
    """What a process keeps between the trials it runs: the plugin registry and the last dataset loaded."""

    registry_key: Any = None
    registry: Any = None
    data_key: Any = None
    data: Any = None

    def registry_for(self, job: TrialJob):
        for path in job.plugin_paths:
            if path not in sys.path:
                sys.path.insert(0, path)
        if self.registry_key != job.plugins:
            with warnings.catch_warnings():  # the host has already reported what failed to load
                warnings.simplefilter("ignore", PluginWarning)
                self.registry, self.registry_key = load_plugins(list(job.plugins)), job.plugins
        return self.registry

    def data_for(self, job: TrialJob, registry, device: torch.device, say: Say):
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
    """The :class:`~noprop_bench.run.runner.TrialSpec` a job describes, resolved against this process's plugins."""
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
        note_exception(record, error)
        return record
    record["executor"] = job.executor
    record["worker"] = worker_identity()
    if job.record_copy_dir and record["status"] in FINISHED_STATUSES:
        try:
            TrialStore(job.record_copy_dir).write_record_file(record)
        except OSError as error:  # the host still gets the record; only the copy is missing
            say(f"warning: could not leave a copy of the record in {job.record_copy_dir}: {error}")
    return record


