"""``check_executor``: an executor plugin runs a tiny grid and hands every record back exactly once."""

import json
import signal
import tempfile
import unittest
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Type

import torch

from ..conformance import describe_class
from ..errors import UsageError
from ..method import reject_unknown_names
from ..run.budget import Budget
from ..run.executor_base import Executor
from ..run.jobs import TrialJob, import_root
from ..run.runner import TrialSpec, trial_header
from .tiny import ConformanceDataset, ConformanceMethod

PLUGIN_MODULE = __name__.rpartition(".")[0] + ".tiny"  # the tiny method and dataset, loaded by every worker


def conformance_jobs(seeds: int = 2, executor: str = "local", out_dir: Optional[str] = None,
                     began_dir: str = "") -> List[TrialJob]:
    """Trial jobs of the tiny conformance method on the tiny dataset (a 96-sample budget each); with
    ``began_dir``, each trial that begins leaves a file ``seed-N`` there."""
    jobs = []
    for seed in range(seeds):
        spec = TrialSpec(method=ConformanceMethod, params={**ConformanceMethod.defaults, "began_dir": began_dir},
                         dataset=ConformanceDataset.name, backbone="noprop_cnn", budget=Budget.parse("96samples"),
                         seed=seed, batch_size=16, device=torch.device("cpu"), augment="none", checkpoints=1,
                         eval_batch_size=64)
        jobs.append(TrialJob(header=trial_header(spec), spec=spec.plain_fields(), data_root=None, download=False,
                             plugins=(PLUGIN_MODULE,), plugin_paths=(import_root(PLUGIN_MODULE),), threads=1,
                             executor=executor, record_copy_dir=out_dir))
    return jobs


def check_executor(cls: Type[Executor], interrupt: bool = True, **options: Any) -> None:
    """Run two tiny CPU trials through ``cls(**options)``, then (with ``interrupt``) three more with a Ctrl-C
    to the host after the first is delivered; an ``AssertionError`` lists a fix for each violation. Skips
    (``unittest.SkipTest``, which pytest honours) when the executor's engine is missing."""
    fixes: List[str] = []
    if not cls.name:
        fixes.append("set the class attribute name = 'my_executor'")
    reject_unknown_names(options, cls.defaults, f"executor {cls.name!r}", "option")
    # options as the command line hands them: text is converted to each default's type
    text = {key: value for key, value in options.items() if isinstance(value, str)}
    options = {**options, **cls.resolve_options(text)}
    executor = cls(cls.name, **options)
    try:
        executor.check_available()
    except UsageError as error:
        raise unittest.SkipTest(str(error)) from None
    device = executor.device_type("cpu")
    if device != "cpu":
        fixes.append(f"device_type('cpu') must return 'cpu' (trials asked to run on the CPU), not {device!r}")
    delivered: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as out_dir:
        executor.out_dir = out_dir
        jobs = conformance_jobs(executor=executor.spec_text, out_dir=out_dir)
        executor.run(jobs, lambda job, record: delivered.append({"job": job.trial_id, "record": record}),
                     lambda message: None)
    _check_deliveries(jobs, delivered, fixes)
    if interrupt and not fixes:
        _check_ctrl_c(cls, options, fixes)
    if fixes:
        lines = "\n".join(f"  - {fix}" for fix in fixes)
        raise AssertionError(f"{describe_class(cls)} breaks the executor contract; to fix:\n{lines}")


def _check_deliveries(jobs: List[TrialJob], delivered: List[Dict[str, Any]], fixes: List[str],
                      statuses: Tuple[str, ...] = ("ok",), all_jobs: bool = True) -> None:
    wanted = [job.trial_id for job in jobs]
    got = [item["job"] for item in delivered]
    if all_jobs and sorted(got) != sorted(wanted):
        fixes.append(f"run() must call deliver(job, record) exactly once per job; jobs {wanted}, delivered {got}")
    # again with the same record is allowed after Ctrl-C (one stopped while being stored is stored again)
    records_of = {job: [item["record"] for item in delivered if item["job"] == job] for job in got}
    if not all_jobs and (any(records != records[:1] * len(records) for records in records_of.values())
                         or not set(got) <= set(wanted)):
        fixes.append(f"after Ctrl-C, run() must deliver only the jobs it was given, each once (or again with the "
                     f"same record); jobs {wanted}, delivered {got}")
    for item in delivered:
        record = item["record"]
        if not isinstance(record, dict) or record.get("trial_id") != item["job"]:
            fixes.append("deliver each job with its own record (the dict execute_job(job) returns)")
            continue
        if record.get("status") not in statuses:
            fixes.append(f"the tiny trial {record.get('trial_id')} must finish {' or '.join(statuses)} through "
                         f"execute_job; got {record.get('status')}: {record.get('error')}")
        try:
            json.dumps(record)
        except (TypeError, ValueError) as error:
            fixes.append(f"deliver records as plain JSON data, as execute_job returns them: {error}")


def _check_ctrl_c(cls: Type[Executor], options: Dict[str, Any], fixes: List[str]) -> None:
    """Ctrl-C to the host (a SIGINT to this process) once the first record is delivered: ``run`` must raise
    the ``KeyboardInterrupt`` again, having delivered every job that began (a job that never began may go
    undelivered: the host lists it as not run), none twice, each ok or interrupted."""
    executor = cls(cls.name, **options)
    executor.check_available()
    executor.device_type("cpu")
    delivered: List[Dict[str, Any]] = []

    def deliver(job: TrialJob, record: Dict[str, Any]) -> None:
        delivered.append({"job": job.trial_id, "record": record})
        if len(delivered) == 1:
            signal.raise_signal(signal.SIGINT)

    # Python's own Ctrl-C handler, also where this process was started with SIGINT ignored (in the background)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with tempfile.TemporaryDirectory() as out_dir:
            executor.out_dir = out_dir
            began_dir = Path(out_dir, "began")
            began_dir.mkdir()
            jobs = conformance_jobs(seeds=3, executor=executor.spec_text, out_dir=out_dir, began_dir=str(began_dir))
            try:
                executor.run(jobs, deliver, lambda message: None)
            except KeyboardInterrupt:
                pass
            else:
                fixes.append("on Ctrl-C (KeyboardInterrupt) run() must stop its jobs, deliver each one that began "
                             "and is not yet delivered (its record, or interrupted(job)) and raise it again; it "
                             "returned")
            began = {job.trial_id for job in jobs if (began_dir / f"seed-{job.header['seed']}").exists()}
    finally:
        signal.signal(signal.SIGINT, previous)
    undelivered = sorted(began - {item["job"] for item in delivered})
    if undelivered:
        fixes.append(f"after Ctrl-C, run() must deliver each job that began (its record, or interrupted(job)); "
                     f"these began and were not delivered: {undelivered}")
    _check_deliveries(jobs, delivered, fixes, statuses=("ok", "interrupted"), all_jobs=False)
