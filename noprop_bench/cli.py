"""The ``noprop-bench`` command line."""

import argparse
import contextlib
import os
import shlex
import signal
import sys
import threading
from datetime import datetime
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from .backbones import check_backbone_name
from .report.baseline import (SETTINGS, check_compatible, compare, environment_differences, load_baseline,
                              not_ok_rows, record_settings, regressions, save_baseline, spec_settings)
from .run.budget import Budget
from .datasets import AUGMENTATIONS
from .errors import EXIT_INTERRUPTED, UsageError
from .help_format import HelpFormatter, non_empty
from .method import as_given
from .run.executor_base import ClusterExecutor
from .run.interrupts import forget_sigterm, note_sigterm
from .run.jobs import (Progress, TrialJob, delivery_problem, failed_record, import_root, threads_beyond_cores,
                       trial_label)
from .run.resume import pending_specs
from .plugins import load_plugins_saying
from .provenance import code_identity
from .report.cli import report_main, run_output_names, write_run_outputs
from .report.code_versions import OLDER_CODE_MARK
from .report.time_to_accuracy import parse_targets
from .scaffold import new_plugin_main
from .run.store import (FINISHED_STATUSES, TrialStore, check_output_directory, latest_per_trial,
                        writing_alone)
from .run.evaluation_plan import DEFAULT_CHECKPOINT_SIZE
from .run.probe import estimate_text
from .run.speed import speed_main
from .run.runner import RunData, TrialSpec, backbone_width, trial_header
from .presets import (PAPER_BUDGET, PRESETS, apply_preset, explicit_options, method_override, paper_budget,
                      preset_method_params)
from .run.speed_settings import add_speed_arguments, chosen_settings
from .specs import distinct_methods, parse_dataset_spec, parse_method_list, parse_method_spec

# the no-argument demo: about two minutes on a 2-core CPU; the paper's statistics need --seeds 3
DEFAULT_METHODS = "noprop_ct,backprop"
DEFAULT_DATASET = "mnist5k"
DEFAULT_BUDGET = "45"
DEFAULT_SEEDS = 1
DEFAULT_EXECUTOR = "local"

EXIT_OK, EXIT_TRIAL_FAILED, EXIT_USAGE, EXIT_REGRESSION = 0, 1, 2, 3
DIVERGED_IS_KEPT = "a diverged trial is kept as finished: another --out, or other settings, trains it anew"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="noprop-bench",
        description=(
            "Compare NoProp with back-propagation and adjoint neural ODEs under the same training-time "
            "budget, on the same timm backbone. With no arguments: the default comparison on the embedded "
            "MNIST sample (mnist5k), about two minutes on a 2-core CPU."
        ),
        epilog=(
            "Method parameters: NAME[key=value,...], e.g. noprop_ct[embedding=prototype,lr=3e-4]; "
            "--list shows every method with its parameters. Results go to OUT/trials.jsonl (one JSON line "
            "per finished trial), with table1.md, table2.md (memory, throughput), time_to_accuracy.md, "
            "curves.csv and figure3.png/.svg rendered from it; rerunning with the same --out skips finished "
            "trials. `noprop-bench report DIR [DIR ...]` re-renders them from trials.jsonl alone "
            "(`noprop-bench report --help`); `noprop-bench new-plugin NAME` writes a ready plugin distribution "
            "(`noprop-bench new-plugin --help`); `noprop-bench speed` times every method's train step and "
            "inference on random images of the dataset's shape (`noprop-bench speed --help`). "
            "Exit status: 0 all trials ok, 1 some trial failed, diverged or was stopped alone (a SIGTERM to its "
            "worker or job, its job's time limit), 2 bad input, 3 regression against --baseline, 130 interrupted."
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help="comma-separated methods to compare, each NAME or NAME[key=value,...]")
    parser.add_argument("--dataset", default=DEFAULT_DATASET,
                        help="dataset name (NAME or NAME:ARGUMENT), e.g. cifar10, or imagefolder:PATH for your own "
                             "PATH/{train,test}/<class>/* images; --list shows them all")
    parser.add_argument("--backbone", type=non_empty, default=None,
                        help="any timm model name, or noprop_cnn (the paper's CNN); every method gets the same "
                             "one. Default: the dataset's choice, resnet18 for all but the embedded mnist5k "
                             "sample, which uses noprop_cnn. For images of at most 64 px the stem is adapted: 3x3 stride-1 first "
                             "convolution and no stem max-pool, so small images keep their resolution")
    parser.add_argument("--budget", default=DEFAULT_BUDGET,
                        help="training budget per trial: SECONDS of training work (evaluation excluded), "
                             "Nsamples / Nsteps (deterministic on the CPU, for regression checks), Nepochs (passes "
                             "over the training split; for noprop_dt summed over its blocks, unless "
                             "schedule=parallel trains every block on every batch), or paper: each "
                             "method's epochs from the paper's table for the dataset's kind (MNIST, CIFAR-10 or "
                             "CIFAR-100). Training time is measured and reported whatever the unit")
    parser.add_argument("--seeds", type=int, default=DEFAULT_SEEDS,
                        help="training seeds per method (0..N-1); the paper uses 3")
    parser.add_argument("--batch-size", type=int, default=128, help="training batch size, the same for every method")
    parser.add_argument("--inference-runs", type=int, default=5,
                        help="final evaluations per trial for stochastic methods (the paper uses 5)")
    parser.add_argument("--checkpoints", type=int, default=8,
                        help="test evaluations during training, log-spaced over the budget, for the curves "
                             "(observed only, never used to select anything)")
    parser.add_argument("--checkpoint-size", type=int, default=DEFAULT_CHECKPOINT_SIZE, metavar="N",
                        help="test images per checkpoint evaluation: a fixed, stratified subset of the test split "
                             "(0: the whole split); the final evaluation always uses the whole test split")
    train_accuracy = parser.add_mutually_exclusive_group()
    train_accuracy.add_argument("--train-accuracy", action="store_true",
                        help="also measure accuracy on the training split at the end (Table 1's train columns), on "
                             "a fixed, stratified subset of at most twice the test split's size")
    train_accuracy.add_argument("--no-train-accuracy", dest="train_accuracy", action="store_false",
                        default=argparse.SUPPRESS,
                        help="do not measure train accuracy (overrides --preset paper, which measures it)")
    parser.add_argument("--inference-sweep", action="store_true",
                        help="after training, evaluate every inference setting a method offers (e.g. NoProp-CT: "
                             "euler and heun at 2..1000 steps) and write inference_sweep.md")
    parser.add_argument("--val-split", type=float, default=0.0, metavar="FRACTION",
                        help="hold out this fraction of each class of the training split as a validation set "
                             "(for methods that select something; the test split is never used to select)")
    augment = parser.add_mutually_exclusive_group()
    augment.add_argument("--augment", choices=AUGMENTATIONS, default=None,
                        help="training augmentation, on the device over whole batches; default: the dataset's "
                             "own choice (crop_flip for the CIFAR family, none for MNIST-like data)")
    augment.add_argument("--no-augment", dest="augment", action="store_const", const="none",
                        help="no augmentation (the paper's v1 setting); same as --augment none")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="training device; auto picks cuda when available")
    add_speed_arguments(parser)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch in each trial (default: torch's choice in-process; an equal "
                             "share of the cores per worker with local[workers=N])")
    parser.add_argument("--executor", type=non_empty, default=DEFAULT_EXECUTOR, metavar="NAME[key=value,...]",
                        help="where trials run: local (this process, one after another), local[workers=N] (N "
                             "worker processes, one GPU or an equal CPU share each), submitit[partition=P,"
                             "gpus_per_node=1,timeout_min=M] (one SLURM job per trial; cluster=local runs "
                             "them here), ray[address=auto,gpus=1] (one Ray task per trial); --list shows "
                             "every executor and its options. Results and resume are the same whichever "
                             "executor ran a trial")
    parser.add_argument("--out", type=non_empty, default=None,
                        help="output directory (default results/<dataset>-<timestamp>); reuse it to resume")
    parser.add_argument("--keep-stale", action="store_true",
                        help="on resume, keep finished trials whose method code differs from the installed one "
                             "(another distribution version or git commit) instead of training them again; "
                             "their rows are marked † in table1.md")
    parser.add_argument("--data-root", type=non_empty, default=None,
                        help="where datasets are stored or downloaded (default: $NOPROP_BENCH_DATA, else "
                             "$XDG_CACHE_HOME/noprop-bench or ~/.cache/noprop-bench)")
    parser.add_argument("--no-download", action="store_true", help="never download datasets")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import MODULE as a plugin (repeatable), for plugins not installed as a distribution")
    parser.add_argument("--targets", default=None, metavar="ACC,ACC,...",
                        help="accuracy thresholds (%%) for the time-to-accuracy table; default: per dataset")
    parser.add_argument("--baseline", type=non_empty, metavar="FILE",
                        help="compare the finished run with this baseline; exit 3 with a table of what regressed "
                             "(also in OUT/regression.md) when accuracy or relative throughput fell beyond the "
                             "tolerances stated in FILE. The run must share the baseline's datasets, budget, "
                             "backbone, batch size, seeds, inference runs, device type, speed settings, "
                             "augmentation and threads (exit 2 otherwise)")
    parser.add_argument("--save-baseline", type=non_empty, metavar="FILE",
                        help="write a baseline from this run's trials to FILE, when every trial finished ok; use a "
                             "sample budget and --threads, which make CPU results reproducible")
    parser.add_argument("--preset", choices=PRESETS, default=None,
                        help="paper: the paper's protocol in one flag: backbone noprop_cnn, no augmentation, each "
                             "method's optimiser settings from the paper (the adjoint with 1000 Euler steps), 3 "
                             "seeds, 5 inference runs, train accuracy, --budget paper; without --methods the 13 "
                             "rows of Table 1. Explicit flags override it and the tables say which; a quick "
                             "speed probe prints an estimate of the total wall time before training starts")
    parser.add_argument("--list", action="store_true",
                        help="list methods, datasets and executors with their plugins and parameters, then exit")
    return parser


def _describe_registry(registry) -> str:
    lines = ["Methods:"]
    for name, cls in sorted(registry.methods.items()):
        params = ", ".join(f"{k}={as_given(v)}" for k, v in cls.defaults.items()) or "no parameters"
        lines.append(f"  {name:<14} {cls.label or name} [{cls.family}] from plugin "
                     f"{registry.provider[f'method:{name}']}; {params}")
    lines.append("Datasets:")
    width = max([14] + [len(name) + 4 * cls.takes_argument for name, cls in registry.datasets.items()])
    for name, cls in sorted(registry.datasets.items()):
        usage = f"{name}:ARG" if cls.takes_argument else name
        what = cls.label or (cls.__doc__ or "").strip().split("\n")[0].rstrip(".") or name  # a path's label is its folder
        lines.append(f"  {usage:<{width}} {what} from plugin {registry.provider[f'dataset:{name}']}")
    lines.append("Executors:")
    for name, cls in sorted(registry.executors.items()):
        options = ", ".join(f"{k}={v!r}" for k, v in cls.defaults.items()) or "no options"
        extra = f" (pip install 'noprop-bench[{cls.extra}]')" if cls.extra else ""
        lines.append(f"  {name:<14} {cls.description} (plugin {registry.provider[f'executor:{name}']}); "
                     f"options: {options}{extra}")
    for name, error in sorted(registry.broken.items()):
        lines.append(f"Broken plugin {name}: {error}")
    return "\n".join(lines)


def _pick_executor(args, registry):
    name, given = parse_method_spec(args.executor, what="executor")
    cls = registry.executor(name)
    executor = cls(args.executor, **cls.resolve_options(given))
    executor.check_available()
    return executor


def _check_counts(args):
    for flag, value, least in (("--seeds", args.seeds, 1), ("--batch-size", args.batch_size, 1),
                               ("--inference-runs", args.inference_runs, 1), ("--checkpoints", args.checkpoints, 0),
                               ("--checkpoint-size", args.checkpoint_size, 0)):
        if value < least:
            raise UsageError(f"{flag} {value}: must be a whole number of at least {least}")
    if not 0.0 <= args.val_split < 1.0:
        raise UsageError(f"--val-split {args.val_split}: must be a fraction in [0, 1)")


def _plan(args, registry, device, command) -> tuple:
    _check_counts(args)
    paper_epochs = args.budget.strip() == PAPER_BUDGET
    budget = None if paper_epochs else Budget.parse(args.budget)
    if budget is not None and budget.name:  # tables group named budgets by name: only the harness names one
        raise UsageError(f"--budget {args.budget!r}: a name in parentheses is what --budget {PAPER_BUDGET} records "
                         f"(as in '100epochs ({PAPER_BUDGET})'); give the amount alone, e.g. "
                         f"{str(Budget(budget.amount, budget.unit))}")
    methods = distinct_methods(
        ((name, registry.method(name), registry.method(name).resolve_params(
            preset_method_params(name, given) if args.preset else given))
         for name, given in parse_method_list(args.methods)),
        lambda message: print(message, file=sys.stderr))
    dataset_name, argument = parse_dataset_spec(args.dataset)
    dataset = registry.dataset(dataset_name)(argument, root=args.data_root, download=not args.no_download)
    backbone = args.backbone or dataset.default_backbone
    check_backbone_name(backbone)
    backbone_width(backbone, tuple(dataset.image_shape))  # bad input stops here, not in every worker
    classes = len(dataset.classes)
    if 0 < args.checkpoint_size < classes:
        print(f"note: --checkpoint-size {args.checkpoint_size}: the subset keeps at least one image of each of the "
              f"{classes} classes, so checkpoints evaluate {classes} or more (the captions give the number)",
              file=sys.stderr)
    augment = args.augment or dataset.augment
    settings = chosen_settings(device.type, args.precision, args.channels_last, args.compile, args.cudnn_benchmark)
    speed = settings.identity()
    specs = [TrialSpec(method=cls, params=params, dataset=dataset.spec, backbone=backbone,
                       budget=paper_budget(cls.name, dataset) if paper_epochs else budget,
                       seed=seed, batch_size=args.batch_size, device=device, augment=augment,
                       inference_runs=args.inference_runs, checkpoints=args.checkpoints,
                       checkpoint_size=args.checkpoint_size,
                       train_accuracy=args.train_accuracy, inference_sweep=args.inference_sweep,
                       val_split=args.val_split, command=command, preset=_preset_record(args, cls, params, settings),
                       speed_settings=speed, dataset_content=dataset.content_id)
             for cls, params in methods for seed in range(args.seeds)]
    return dataset, specs


def _preset_record(args, cls, params, speed) -> Optional[dict]:
    """What a trial's record says of the preset: its name and every way the run departs from it. bf16
    arithmetic departs from it too (the paper trained in full precision; bf16 changes what is computed,
    while TF32, channels-last and compilation stay within the tested tolerance of fp32 eager)."""
    if not args.preset:
        return None
    method = method_override(cls, params)
    arithmetic = [f"--precision {speed.precision}"] if speed.precision == "bf16" else []
    return {"name": args.preset, "overrides": args.preset_overrides + arithmetic + ([method] if method else [])}


@contextlib.contextmanager
def sigterm_as_ctrl_c():
    """While the trials run, a SIGTERM (how CI systems and schedulers cancel a job) stops the run as Ctrl-C
    does: unfinished trials are recorded as interrupted and the tables written. It is passed on as a SIGINT,
    so the executors' handling of Ctrl-C applies. Where the run was started with SIGINT ignored (a
    background job of a non-interactive shell), SIGINT stays ignored, here and in the processes the run
    starts, and the SIGTERM is raised here as Ctrl-C itself (``ctrl_c_held`` then holds SIGTERM back
    instead); where Python cannot see SIGINT's handler, SIGTERM keeps its usual effect."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def as_ctrl_c(signum, frame):
        sigint = signal.getsignal(signal.SIGINT)
        if sigint is None:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        note_sigterm()  # the interrupted trials say what stopped them
        if sigint is signal.SIG_IGN:
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGINT)

    forget_sigterm()
    previous = signal.signal(signal.SIGTERM, as_ctrl_c)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        forget_sigterm()


SUBCOMMANDS = {"report": report_main, "speed": speed_main, "new-plugin": new_plugin_main}


def run(argv: Optional[List[str]] = None) -> int:
    with contextlib.ExitStack() as held:  # the --out folder, once the run writes there (writing_alone)
        return _run(argv, held)


def _run(argv: Optional[List[str]], held: contextlib.ExitStack) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    args.preset_overrides = apply_preset(args, explicit_options(parser, argv)) if args.preset else []
    command = shlex.join(["noprop-bench", *argv])
    say = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731

    registry = load_plugins_saying(args.plugin, say)
    if args.list:
        print(_describe_registry(registry))
        return EXIT_OK
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads {args.threads}: must be a whole number of at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    executor = _pick_executor(args, registry)
    crowded = threads_beyond_cores(args.threads, "which slows training (a seconds budget buys less)")
    if crowded and getattr(executor, "runs_here", not isinstance(executor, ClusterExecutor)):  # trials run here
        say(f"warning: {crowded}")
    device = torch.device(executor.device_type(args.device))
    dataset, specs = _plan(args, registry, device, command)
    if args.save_baseline:
        _check_baseline_target(args)
    baseline = load_baseline(args.baseline) if args.baseline else None  # bad file: fail before training
    if baseline:
        check_compatible(baseline, spec_settings(specs, threads=executor.threads_per_trial(args.threads)))
    if args.targets is not None:
        parse_targets(args.targets)  # bad input: fail before training, not when the tables are written

    out = Path(args.out or Path("results") / f"{dataset.name}-{datetime.now():%Y%m%d-%H%M%S}")
    check_output_directory(out, "--out")
    locked = out.is_dir()
    if locked:  # before reading what it holds; a new folder is held once made, below
        held.enter_context(writing_alone(out))
    store = TrialStore(out)
    for record in store.merge_record_files():
        say(f"recorded {trial_label(record)} seed {record.get('seed')}: it finished after the last run's "
            f"host had stopped")
    pending = pending_specs(specs, store.read()[0], args.keep_stale, say, str(store.path))
    if baseline:  # a kept trial keeps the threads it ran with: refuse now, not after the others trained
        pending_ids = {spec.trial_id for spec in pending}
        _check_kept_trials(baseline, store, [spec for spec in specs if spec.trial_id not in pending_ids])
    problems = []
    jobs = [_job(spec, args, executor) for spec in pending]
    if jobs:
        executor.check_jobs(jobs, say)
    if jobs and args.preset:
        say(estimate_text(pending, RunData.load(dataset, device, val_split=args.val_split)))
    if jobs:
        budgets = ", ".join(dict.fromkeys(str(spec.budget) for spec in specs))
        say(f"{len(jobs)} trial(s) on {dataset.spec}, budget {budgets} each, backbone {specs[0].backbone}, "
            f"device {device}, {specs[0].speed.describe()}, executor {executor.spec_text}")

    progress = Progress(len(jobs))
    current_code = {spec.method.name: code_identity(spec.method) for spec in specs}

    delivered = {}  # trial id -> the record stored for it
    by_executor = f"executor {executor.spec_text!r}"
    host_errors = []  # what deliver itself raised (the store's disk, say): never blamed on the executor

    def deliver(job: TrialJob, record) -> None:
        try:
            _store_delivered(job, record)
        except Exception as error:
            host_errors.append(error)
            raise

    def _store_delivered(job: TrialJob, record) -> None:
        first = delivered.get(job.trial_id)
        if first is not None and record is not first and record != first:
            say(f"warning: {by_executor} delivered {job.describe()} again with another record; the first is kept")
            return
        if first is None:
            problem = delivery_problem(job, record)
            if problem:  # stored as this trial's failure, so the run and a rerun see it
                record = failed_record(job, f"{by_executor} delivered {problem}")
        store.append(record)  # the same record again (an executor's recovery after Ctrl-C) is stored again
        delivered[job.trial_id] = record
        if record["status"] in FINISHED_STATUSES:
            store.forget_record_file(record)
        if first is not None:
            return
        say(progress.line(job, record))
        try:
            registry.hook.trial_finished(record=record, out_dir=str(out))
        except Exception as error:  # an observer's failure must not stop the benchmark
            say(f"warning: a trial_finished observer failed: {type(error).__name__}: {error}")
        if record["status"] != "ok":  # an interrupted trial here was stopped alone (else the run stops)
            problems.append(record)

    executor.out_dir = str(out)
    # the outermost directory this run will make, if any: what a refusal before any trial takes away again
    made = next((path for path in reversed([out, *out.parents]) if not path.exists()), None)
    try:
        if jobs:
            out.mkdir(parents=True, exist_ok=True)  # an executor may keep its files there before the first record
            if not locked:
                held.enter_context(writing_alone(out))
        if out.is_dir():  # what this command planned, for a report to name the trials it never began
            store.write_plan(command, [{"trial_id": spec.trial_id, "trial": spec.describe(),
                                        "dataset": dataset.display_name} for spec in specs], args.targets)
        if jobs:
            with sigterm_as_ctrl_c():
                try:
                    executor.run(jobs, deliver, say)
                    cause = f"{by_executor} returned without delivering this trial"
                except UsageError:  # refused before anything was kept: leave no trace, and no plan of it
                    store.plan_path.unlink(missing_ok=True)
                    _remove_empty_up_to(out, made)
                    raise
                except Exception as error:  # noqa: BLE001 - the executor's own failure: keep what it delivered
                    if any(error is raised for raised in host_errors):
                        raise
                    say(f"{by_executor} failed: {type(error).__name__}: {error}")
                    if isinstance(error.__context__, KeyboardInterrupt):  # it failed while stopping for Ctrl-C
                        raise error.__context__ from error
                    cause = f"{by_executor} failed before delivering this trial: {type(error).__name__}: {error}"
                for job in jobs:
                    if job.trial_id not in delivered:
                        deliver(job, failed_record(job, cause))
        store.remove_empty_record_files_dir()
    except KeyboardInterrupt:
        say(f"interrupted; finished trials are kept in {store.path}. Rerun with --out {out} to resume.")
        if args.baseline:
            say(f"--baseline {args.baseline}: not compared, as the run was interrupted")
        if args.save_baseline:
            say(f"--save-baseline {args.save_baseline}: not written, as the run was interrupted")
        try:
            not_run, stale = _not_reached([job for job in jobs if job.trial_id not in delivered], store,
                                          dataset.display_name)
            if not_run:
                say(f"{len(not_run)} planned trial(s) did not begin; the same command runs them")
            if stale:
                say(f"{len(stale)} stale trial(s) were not trained again: the tables show their older results "
                    f"(marked {OLDER_CODE_MARK} where their code differs); the same command retrains them")
            if store.path.exists():
                print(write_run_outputs(store.directory, targets=args.targets, current_code=current_code,
                                        not_run=not_run))
        except KeyboardInterrupt:
            say(f"interrupted again: the tables were not written; noprop-bench report {out} writes them")
        return EXIT_INTERRUPTED
    try:
        print(write_run_outputs(store.directory, targets=args.targets, current_code=current_code))
    except KeyboardInterrupt:
        say(f"interrupted while writing the tables; every trial is kept in {store.path}, and "
            f"noprop-bench report {out} writes them")
        return EXIT_INTERRUPTED
    say(f"results in {out}/ ({run_output_names(out)})")
    if problems:
        say(f"{len(problems)} trial(s) did not finish ok:")
        for record in problems:
            where = (f" (raised at {record['error_at']}; its traceback is in {store.path})"
                     if record.get("error_at") else "")
            say(f"  {trial_label(record)} seed {record['seed']}: {record['status']}: {record['error']}{where}")
        if args.baseline and all(record["status"] in FINISHED_STATUSES for record in problems):
            code = _check_baseline(args, baseline, store, specs, command, say, save=False)  # a diverged row fails
            if args.save_baseline:
                say(f"not done, as not every trial finished ok: --save-baseline {args.save_baseline} "
                    f"({DIVERGED_IS_KEPT})")
            return code
        skipped = [f"the check against --baseline {args.baseline}" if args.baseline else "",
                   f"--save-baseline {args.save_baseline}" if args.save_baseline else ""]
        if any(skipped):
            notes = []
            if any(record["status"] not in FINISHED_STATUSES for record in problems):
                notes.append("rerun the same command: failed and interrupted trials are trained again")
            if any(record["status"] in FINISHED_STATUSES for record in problems):
                notes.append(DIVERGED_IS_KEPT)
            say(f"not done, as not every trial finished ok: {' and '.join(filter(None, skipped))} "
                f"({'; '.join(notes)})")
        return EXIT_TRIAL_FAILED
    if args.baseline or args.save_baseline:
        return _check_baseline(args, baseline, store, specs, command, say)
    return EXIT_OK


def _job(spec: TrialSpec, args, executor) -> TrialJob:
    data_root = str(Path(args.data_root).resolve()) if args.data_root else None  # workers may start elsewhere
    return TrialJob(header=trial_header(spec), spec=spec.plain_fields(), data_root=data_root,
                    download=not args.no_download, plugins=tuple(args.plugin),
                    plugin_paths=tuple(filter(None, (import_root(module) for module in args.plugin))),
                    threads=executor.threads_per_trial(args.threads), executor=executor.spec_text)


def _not_reached(undelivered: List[TrialJob], store: TrialStore, dataset: str) -> Tuple[List[str], List[TrialJob]]:
    """Of the trials an interrupted run did not deliver: a "not run" line for each that never began, and the
    stale ones it had not trained again, whose older finished results the tables still show."""
    finished = {str(r.get("trial_id")) for r in latest_per_trial(store.read()[0])
                if r.get("status") in FINISHED_STATUSES} if store.path.exists() else set()
    stale = [job for job in undelivered if job.trial_id in finished]
    not_run = [f"{job.describe()} on {dataset}: not run (the run was interrupted before it began)"
               for job in undelivered if job not in stale]
    return not_run, stale


def _check_baseline_target(args) -> None:
    """Refuse, before training, a ``--save-baseline`` path that cannot be written or is ``--baseline``."""
    target = Path(args.save_baseline)
    if target.is_dir():
        raise UsageError(f"--save-baseline {target}: is a directory; give a file name, e.g. {target / 'baseline.json'}")
    if args.baseline and target.resolve() == Path(args.baseline).resolve():
        raise UsageError(f"--save-baseline {target} is also --baseline: the run would be compared with the file "
                         f"and then overwrite it; save to another file")
    check_output_directory(target.parent, "--save-baseline")


def _check_kept_trials(baseline, store: TrialStore, kept_specs) -> None:
    """Refuse, before training, a --baseline run whose --out already holds finished trials (kept, not trained
    again) of other settings than the baseline's: the torch threads, which only a trial's record knows."""
    if not kept_specs:
        return
    wanted = {spec.trial_id for spec in kept_specs}
    kept = [r for r in latest_per_trial(store.read()[0]) if r.get("trial_id") in wanted]
    if not kept:
        return
    try:
        check_compatible(baseline, {**dict.fromkeys(SETTINGS), "threads": record_settings(kept)["threads"]})
    except UsageError as error:
        raise UsageError(f"--out {store.directory} already holds finished trials of this run, kept with the threads "
                         f"they ran with: {error}; or rerun into a new --out") from None


def _remove_empty_up_to(directory: Path, outermost: Optional[Path]) -> None:
    """Remove ``directory`` and its parents up to ``outermost`` (None: nothing) while they are empty."""
    if outermost is None:
        return
    for path in [directory, *directory.parents]:
        if not path.is_dir() or any(path.iterdir()):
            return
        path.rmdir()
        if path == outermost:
            return


def _check_baseline(args, baseline, store: TrialStore, specs, command: str, say, save: bool = True) -> int:
    """Compare the run's trials with --baseline (exit 3 on a regression; 1 when the comparison passed but a
    trial did not finish ok, in a row the baseline lacks), then write --save-baseline when ``save``."""
    wanted = {spec.trial_id for spec in specs}
    records = [r for r in latest_per_trial(store.read()[0]) if r.get("trial_id") in wanted]
    code = EXIT_OK
    if args.baseline:  # first: a baseline that cannot be saved must not hide the comparison
        try:
            comparison = compare(records, baseline)
        except UsageError:
            if args.save_baseline:
                say(f"--save-baseline {args.save_baseline}: not written, as the comparison was refused")
            raise
        text = comparison.to_markdown(index=False)
        differences = environment_differences(baseline, records)
        caveat = (f"This run's environment differs from the baseline's: {'; '.join(differences)}. Results "
                  f"reproduce exactly only in the baseline's environment: a small move in accuracy may be the "
                  f"environment's, not the code's." if differences else "")
        (store.directory / "regression.md").write_text(f"# Against {args.baseline}\n\n{text}\n"
                                                       + (f"\n{caveat}\n" if caveat else ""))
        print(text)
        if caveat:
            say(f"note: {caveat}")
        failed = regressions(comparison)
        if len(failed):
            say(f"regression against {args.baseline}: {len(failed)} row(s) failed the check: "
                + "; ".join(f"{row['row']}: {row['verdict']}" for _, row in failed.iterrows()))
            code = EXIT_REGRESSION
        else:
            say(f"no regression against {args.baseline}")
            if not_ok_rows(records):  # diverged in a row the baseline lacks (listed there as not checked)
                code = EXIT_TRIAL_FAILED
    if args.save_baseline and save:
        try:
            save_baseline(records, args.save_baseline, command)
        except UsageError as error:
            if code != EXIT_REGRESSION:
                raise
            say(f"noprop-bench: error: {error}")  # the regression found above decides the exit status
            return code
        say(f"baseline written to {args.save_baseline}")
    return code


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    program = "noprop-bench" + (f" {argv[0]}" if argv and argv[0] in SUBCOMMANDS else "")  # as argparse says it
    try:
        code = run(argv)
    except UsageError as error:
        print(f"{program}: error: {error}", file=sys.stderr)
        code = EXIT_USAGE
    except KeyboardInterrupt:  # before any trial ran (e.g. while plugins import): nothing to keep
        print("noprop-bench: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    sys.exit(code)
