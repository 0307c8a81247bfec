"""``check_executor``: an executor plugin runs a tiny grid and hands every record back exactly once."""

import json
import tempfile
import unittest
from typing import Any, Dict, List, Optional, Type

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


def conformance_jobs(seeds: int = 2, executor: str = "local", out_dir: Optional[str] = None) -> List[TrialJob]:
    """Trial jobs of the tiny conformance method on the tiny dataset (a 96-sample budget each)."""
    jobs = []
    for seed in range(seeds):
        spec = TrialSpec(method=ConformanceMethod, params=dict(ConformanceMethod.defaults),
                         dataset=ConformanceDataset.name, backbone="noprop_cnn", budget=Budget.parse("96samples"),
                         seed=seed, batch_size=16, device=torch.device("cpu"), augment="none", checkpoints=1,
                         eval_batch_size=64)
        jobs.append(TrialJob(header=trial_header(spec), spec=spec.plain_fields(), data_root=None, download=False,
                             plugins=(PLUGIN_MODULE,), plugin_paths=(import_root(PLUGIN_MODULE),), threads=1,
                             executor=executor, record_copy_dir=out_dir))
    return jobs


def check_executor(cls: Type[Executor], **options: Any) -> None:
    """Run two tiny CPU trials through ``cls(**options)``; an ``AssertionError`` lists a fix for each
    violation. Skips (``unittest.SkipTest``, which pytest honours) when the executor's engine is missing."""
    fixes: List[str] = []
    if not cls.name:
        fixes.append("set the class attribute name = 'my_executor'")
    reject_unknown_names(options, cls.defaults, f"executor {cls.name!r}", "option")
    # options as the command line hands them: text is converted to each default's type
    options = {**options, **cls.resolve_options({key: value for key, value in options.items() if isinstance(value, str)})}
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
    wanted = [job.trial_id for job in jobs]
    got = [item["job"] for item in delivered]
    if sorted(got) != sorted(wanted):
        fixes.append(f"run() must call deliver(job, record) exactly once per job; jobs {wanted}, delivered {got}")
    for item in delivered:
        record = item["record"]
        if not isinstance(record, dict) or record.get("trial_id") != item["job"]:
            fixes.append("deliver each job with its own record (the dict execute_job(job) returns)")
            continue
        if record.get("status") != "ok":
            fixes.append(f"the tiny trial {record.get('trial_id')} must finish ok through execute_job; got "
                         f"{record.get('status')}: {record.get('error')}")
        try:
            json.dumps(record)
        except (TypeError, ValueError) as error:
            fixes.append(f"deliver records as plain JSON data, as execute_job returns them: {error}")
    if fixes:
        lines = "\n".join(f"  - {fix}" for fix in fixes)
        raise AssertionError(f"{describe_class(cls)} breaks the executor contract; to fix:\n{lines}")
