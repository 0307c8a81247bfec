"""``noprop-bench speed``: what a trial spends its budget and its evaluation on, without training to accuracy.

For each method and each combination of speed settings asked for, on random images of the dataset's
shape (the dataset is never loaded or downloaded, but for an image folder's decoding, cached, to learn
its shape): the median milliseconds of a train step after
warm-up (the device synchronised around each step), samples per second, the ratio to backprop (or to
the first method), inference images per second at the method's final-evaluation setting and at its
checkpoint setting, and the peak memory of the train steps. Writes ``speed.md`` and ``speed.json``.
With ``--profile N``, each row then profiles a few more train steps, after all it times, and ranks their N
costliest operators (see :mod:`.profile`).
"""

import argparse
import gc
import itertools
import json
import os
import shlex
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import pandas as pd
import torch

from .. import __version__
from ..backbones import check_backbone_name, create_backbone
from ..conformance import loss_fixes, step_metrics_fixes, violation
from ..datasets import Normalizer, Split
from ..errors import EXIT_INTERRUPTED, UsageError
from ..help_format import HelpFormatter, non_empty
from ..method import row_label_with_settings
from ..plugins import load_plugins_saying
from ..specs import distinct_methods, parse_dataset_spec, parse_method_list
from ..task import Task
from .contention import BUSY_SHARE, cpu_counters, others_cpu_share
from .cuda_graphs import first_line
from .evaluation import evaluate, inference_layout
from .evaluation_plan import evaluation_batch_size, evaluation_batches
from .jobs import cpu_count, note_exception, threads_beyond_cores
from .memory import WITH_GRAPH_POOLS, PeakMemory, with_graph_pools
from .profile import StepProfile, profile_steps
from .runner import backbone_width, build_trial_method
from .speed_settings import (COMPILE_MODES, PRECISIONS, SpeedSettings, add_cudnn_benchmark_arguments,
                             apply_speed_settings, backend_flags, default_settings)
from .store import check_output_directory, device_name, environment
from .warmup import WARMUP_STEPS

DEFAULT_METHODS = "backprop,noprop_dt,noprop_ct,noprop_fm,adjoint"
# steps timed and warm-up steps before them; the CPU gets fewer so the five built-ins take under a minute
STEPS = {"cuda": (50, 5), "cpu": (3, 1)}
INFERENCE_IMAGES = {"cpu": 256}  # CUDA: the evaluation batch the trial would use
PROFILED_STEPS = 10  # at most; never more than the steps timed
FIGURES = ("ms_per_step", "samples_per_second", "inference_images_per_second_final",
           "inference_images_per_second_checkpoint", "peak_memory_bytes")
MEMORY_WORDS = {"cpu_peak_rss": "cpu_peak_rss: the whole process's peak resident set size, interpreter and "
                                "libraries included",
                "cuda_max_allocated": "cuda_max_allocated: the most the caching allocator handed out"}
NOISY_STEPS = 1.5  # a row whose slowest timed step took this many times its fastest says so
BUSY_LOAD = 1.25  # a 1-minute load average above this many times the cores: other processes competed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="noprop-bench speed",
        description="Time each method's train step and inference on random images of the dataset's shape "
                    "(no dataset is loaded or downloaded; an imagefolder is decoded once, and cached, to learn its "
                    "shape), for every combination of the speed settings given; prints a "
                    "markdown table and writes speed.md and speed.json.",
        formatter_class=HelpFormatter)
    parser.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated methods, NAME[key=value,...]")
    parser.add_argument("--dataset", default="mnist5k", help="whose image shape and class count to use")
    parser.add_argument("--data-root", type=non_empty, default=None,
                        help="where datasets are stored, as for a run (an image folder is decoded once to learn its "
                             "shape, and cached there); nothing is downloaded")
    parser.add_argument("--backbone", type=non_empty, default=None,
                        help="timm model name or noprop_cnn; default: the dataset's")
    parser.add_argument("--batch-size", type=int, default=128, help="training batch size")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to time the methods; auto: CUDA when there is a GPU, else the CPU")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch, as the main command's --threads (default: torch's choice)")
    parser.add_argument("--precision", default=None,
                        help=f"comma-separated, from {', '.join(PRECISIONS)}; default: the device's default")
    channels_last = parser.add_mutually_exclusive_group()
    channels_last.add_argument("--channels-last", nargs="?", const="on", default=None, metavar="off,on",
                        help="comma-separated off/on (alone: on); default: the device's default")
    channels_last.add_argument("--no-channels-last", dest="channels_last", action="store_const", const="off",
                        default=argparse.SUPPRESS,
                        help="same as --channels-last off")
    parser.add_argument("--compile", default=None,
                        help=f"comma-separated, from {', '.join(COMPILE_MODES)}; default: none")
    add_cudnn_benchmark_arguments(parser, "(in the untimed warm-up; one value per run, as cuDNN keeps what it "
                                          "chose for the whole process)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"timed train steps per row (default: {STEPS['cuda'][0]} on CUDA, {STEPS['cpu'][0]} "
                             f"on the CPU)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after timing, profile a few more train steps of each row (torch.profiler) and list "
                             "its N operators with the most own time (device time on CUDA), with the device's "
                             "busy time per step; 0: no profile")
    parser.add_argument("--out", type=non_empty, default=None, help="directory for speed.md and speed.json "
                                                    "(default results/speed-<dataset>-<timestamp>)")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE", help="import MODULE as a plugin")
    return parser


def _choices(text: Optional[str], allowed: Sequence[str], flag: str, default: Any) -> List[Any]:
    if text is None:
        return [default]
    values = list(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))  # a value given twice: one row
    if not values:
        raise UsageError(f"{flag} {text!r}: give one or more of {', '.join(allowed)}, comma-separated")
    for value in values:
        if value not in allowed:
            raise UsageError(f"{flag} {value!r}: accepted: {', '.join(allowed)}")
    return values


def settings_grid(args, device_type: str) -> List[SpeedSettings]:
    """Every combination of the settings given (the device's default for a setting not given)."""
    base = default_settings(device_type)
    precisions = _choices(args.precision, PRECISIONS, "--precision", base.precision)
    layouts = [v == "on" for v in _choices(args.channels_last, ("off", "on"), "--channels-last",
                                            "on" if base.channels_last else "off")]
    modes = _choices(args.compile, COMPILE_MODES, "--compile", base.compile)
    autotuning = [base.cudnn_benchmark if args.cudnn_benchmark is None else args.cudnn_benchmark]
    grid = [SpeedSettings(*values) for values in itertools.product(precisions, layouts, modes, autotuning)]
    for settings in grid:
        settings.check_device(device_type)
    return grid


def random_task(dataset, backbone: str, device: torch.device, images: int) -> Task:
    """A task of the dataset's shape and classes on random images (labels cycle through the classes)."""
    shape = tuple(dataset.image_shape)
    generator = torch.Generator().manual_seed(0)
    train_images = torch.randint(0, 256, (images, *shape), dtype=torch.uint8, generator=generator).to(device)
    labels = (torch.arange(images) % dataset.num_classes).to(device)
    return Task(num_classes=dataset.num_classes, image_shape=shape, device=device, backbone_name=backbone,
                make_backbone=lambda: create_backbone(backbone, in_chans=shape[0], image_size=tuple(shape[1:])),
                backbone_features=backbone_width(backbone, shape),
                normalize=Normalizer(dataset.mean, dataset.std, device), train_images=train_images,
                train_labels=labels, seed=0)


def _timed(call: Callable[[], Any], synchronize: Callable[[], None]) -> float:
    synchronize()
    started = time.perf_counter()
    call()
    synchronize()
    return time.perf_counter() - started


def _inference_images_per_second(method, task: Task, images: int, setting: Dict[str, Any], settings: SpeedSettings,
                                 synchronize, warm: bool) -> float:
    """Images/s of one evaluation pass as a trial's evaluations run it: the same batches and layout."""
    split = Split(task.train_images[:images], task.train_labels[:images])
    batches = evaluation_batches(task.device, task.image_shape, method.stochastic and method.reuses_features())

    def predict():
        with inference_layout(method, task.device.type, settings):
            evaluate(method, split, task.normalize, batches, seed=0, setting=setting, require_finite=False)

    if warm:  # compiled code, or cuDNN and cuBLAS choosing kernels for a batch shape not seen yet
        predict()
    seconds = _timed(predict, synchronize)
    return images / max(seconds, 1e-9)


def warmup_steps(plain: int, settings: SpeedSettings) -> int:
    """Untimed steps before a row's timed ones: under --compile at least as many as a trial's warm-up
    (inductor's reduce-overhead mode records its CUDA graphs on the third call)."""
    return max(plain, WARMUP_STEPS) if settings.compile != "none" else plain


def warmup_text(grid: Sequence[SpeedSettings], plain: int) -> str:
    """The header's words on the untimed warm-up steps, compiled rows warming up longer than the others."""
    compiled = warmup_steps(plain, next((s for s in grid if s.compile != "none"), SpeedSettings()))
    if compiled == plain:  # no row compiled, or compiled rows need no more steps
        return f"{plain} untimed warm-up step(s)"
    if all(settings.compile != "none" for settings in grid):
        return f"{compiled} untimed warm-up step(s), as compiled trials warm up"
    return f"{plain} untimed warm-up step(s) ({compiled} for rows under --compile, as trials warm up)"


def measure(cls, params: Dict[str, Any], task: Task, settings: SpeedSettings, batch_size: int, steps: int,
            warmup: int, inference_images: int, profile_top: int = 0) -> Dict[str, Any]:
    """One row: a fresh method under ``settings``, warmed up, then ``steps`` timed train steps, with
    ``profile_top`` a profile of a few more, and one timed inference pass at each of its final and
    checkpoint settings."""
    device = task.device
    synchronize = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    with backend_flags(settings):
        torch.manual_seed(0)
        method = build_trial_method(cls, task, params).to(device)  # a method's refusal fails its row alone
        method.train()
        applied = apply_speed_settings(method, settings, device.type)
        x = task.normalize(task.train_images[:batch_size])
        y = task.train_labels[:batch_size]
        started = time.perf_counter()
        for number in range(warmup):
            metrics = method.train_step(x, y)
            fixes = (step_metrics_fixes(metrics) or loss_fixes(metrics)) if number == 0 else []
            if fixes:  # a trial fails such a method: a speed row must not time it as if it were fine
                raise violation(cls, fixes)
        if applied.captured:
            method.warm_up_calls(x, y)
        synchronize()
        warmup_seconds = time.perf_counter() - started
        memory = PeakMemory(device)
        counters = cpu_counters()
        with memory:
            times = [_timed(lambda: method.train_step(x, y), synchronize) for _ in range(steps)]
        others = others_cpu_share(counters, cpu_counters())
        warm = settings.compile != "none" or device.type == "cuda"
        final = _inference_images_per_second(method, task, inference_images, {}, settings, synchronize, warm)
        checkpoint = _inference_images_per_second(method, task, inference_images, method.checkpoint_setting(),
                                                  settings, synchronize, warm)
        # last, so that nothing this row times runs with the profiler attached
        profiled = _profiled(lambda: method.train_step(x, y), min(steps, PROFILED_STEPS), device, profile_top)
    median = statistics.median(times)
    peak_bytes, memory_kind = with_graph_pools(memory.kind, memory.peak_bytes, applied.update_pool_bytes())
    return {
        "method": cls.name, "row_label": row_label_with_settings(cls, params), "params": params,
        "param_defaults": dict(cls.defaults), "settings": settings.describe(), **applied.record(),
        "ms_per_step": 1000 * median, "ms_per_step_range": [1000 * min(times), 1000 * max(times)],
        "samples_per_second": batch_size / median,
        "inference_images_per_second_final": final, "inference_images_per_second_checkpoint": checkpoint,
        "checkpoint_setting": method.checkpoint_setting(), "inference_images": inference_images,
        "peak_memory_bytes": peak_bytes, "memory_kind": memory_kind,
        "warmup_seconds": warmup_seconds, "warmup_steps": warmup, "steps_timed": steps,
        "others_cpu_share": others,
        **profiled,
    }


def _profiled(step: Callable[[], Any], steps: int, device: torch.device, top: int) -> Dict[str, Any]:
    """``{"profile": ...}`` for a row asked to be profiled, ``{"profile_error": ...}`` if the profiler failed
    (the row's timings stand), nothing when ``top`` is 0."""
    if top <= 0:
        return {}
    try:
        return {"profile": profile_steps(step, steps, device, top).as_dict()}
    except (UsageError, KeyboardInterrupt):
        raise
    except Exception as error:  # noqa: BLE001 - a profiler failure must not discard the row's timings
        return {"profile_error": first_line(error)}


def _figure(value: float) -> str:
    """A rate at a sensible precision: whole numbers from 100 up, three significant figures below."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def row_summary(row: Dict[str, Any]) -> str:
    """One measured row in a line, printed as soon as it is measured (a run cut short keeps its figures)."""
    return (f"{row['ms_per_step']:.2f} ms/step ({_figure(1000 / row['ms_per_step'])} steps/s), inference "
            f"{_figure(row['inference_images_per_second_final'])} img/s final, "
            f"{_figure(row['inference_images_per_second_checkpoint'])} img/s checkpoint; "
            f"warm-up {row['warmup_seconds']:.1f} s"
            + (f"; CUDA graphs: {', '.join(row['captured'])}" if row.get("captured") else "")
            + (f"; {_busy_text(row['profile'])}" if row.get("profile") else "")
            + (f"; the profiler failed: {row['profile_error']}" if row.get("profile_error") else ""))


def _busy_text(profile: Dict[str, Any]) -> str:
    who = "device" if profile["device_type"] == "cuda" else "operators"
    return f"{who} busy {profile['busy_ms_per_step']:.2f} ms per profiled step"


def render_profiles(rows: List[Dict[str, Any]]) -> str:
    """A section per profiled row: its costliest operators (empty when nothing was profiled)."""
    sections = [f"## Profile: {row['row_label']}, {row['settings']}\n\n"
                + (f"{row['profile']['steps']} train steps under torch.profiler after the timed steps and the "
                   f"inference passes; {_busy_text(row['profile'])} (the timed median was "
                   f"{row['ms_per_step']:.2f} ms).\n\n{StepProfile(**row['profile']).markdown()}\n"
                   if row.get("profile") else f"Not profiled: the profiler failed: {row['profile_error']}\n")
                for row in rows if row.get("profile") or row.get("profile_error")]
    return "".join(f"\n{section}" for section in sections)


def failed_row(cls, params: Dict[str, Any], settings: SpeedSettings, error: BaseException) -> Dict[str, Any]:
    """The row of a method that could not be measured under ``settings``: what went wrong, no figures."""
    row = {"method": cls.name, "row_label": row_label_with_settings(cls, params), "params": params,
           "param_defaults": dict(cls.defaults), "settings": settings.describe(), **settings.as_dict(),
           "error": first_line(error),
           "compile_fallbacks": {}, "capture_fallbacks": {}, **{key: None for key in FIGURES}}
    note_exception(row, error, cls)  # error_at: the method's own line that raised, and the traceback's end
    return row


def add_ratios(rows: List[Dict[str, Any]]) -> None:
    """Each row's samples/s over the reference's with the same settings: backprop at its default parameters
    when present, else the first backprop row, else the first row (measured ones first, in each case); None
    where either was not measured.
    ``ratio_to`` names the reference: its method, or its row label when its parameters are not the defaults."""
    def plain(row):
        return row.get("params") == row.get("param_defaults")

    reference = min(rows, key=lambda row: (row["method"] != "backprop", not plain(row),
                                           not row.get("samples_per_second"), rows.index(row)))
    for row in rows:
        base = next((r for r in rows if r["row_label"] == reference["row_label"]
                     and r["settings"] == row["settings"]), None)
        row["ratio_to"] = reference["method"] if plain(reference) else reference["row_label"]
        measured = base is not None and base["samples_per_second"] and row["samples_per_second"]
        row["ratio"] = row["samples_per_second"] / base["samples_per_second"] if measured else None


def _cell(value: Optional[float], spec: str, scale: float = 1.0) -> str:
    """A figure in plain digits (large rates in a general format read as 3.47955e+06); "–" when not measured."""
    return "–" if value is None else format(value / scale, spec)


def _noisy_steps(row: Dict[str, Any]) -> List[str]:
    """A note when the timed steps of a row differ widely, or other processes kept the CPU busy while they
    ran: something else took the device or the CPU."""
    fastest, slowest = row.get("ms_per_step_range") or (None, None)
    notes = []
    if fastest and slowest > NOISY_STEPS * fastest:
        notes.append(f"steps took {fastest:.2f}-{slowest:.2f} ms: disturbed, rerun on an idle machine")
    if _others_were_busy(row):
        notes.append(f"other processes kept {row['others_cpu_share']:.0%} of the machine's cores busy while its "
                     f"steps ran: slowed, rerun on an idle machine")
    return notes


def _others_were_busy(row: Dict[str, Any]) -> bool:
    share = row.get("others_cpu_share")
    return isinstance(share, (int, float)) and share > BUSY_SHARE


def busy_machine_text(load: Optional[float], cpus: Optional[int], threads: int) -> str:
    """A caption sentence when the machine's load average, above what this run's own ``threads`` explain,
    shows other processes competing for the ``cpus`` this process may use."""
    if load is None or not cpus or load <= BUSY_LOAD * max(cpus, threads):
        return ""
    return (f" The machine was busy: its 1-minute load average reached {load:.1f} on the {cpus} cores this "
            f"process may use, so steps may have run slower than on an idle machine; the ratios, measured "
            f"side by side, hold better than the milliseconds.")


def busy_rows_text(rows: List[Dict[str, Any]]) -> str:
    """A caption sentence when other processes kept the CPU busy while some rows timed their steps (a load
    too recent or too short for the load average to show)."""
    busy = [row for row in rows if _others_were_busy(row)]
    if not busy:
        return ""
    return (f" Other processes kept the CPU busy while {len(busy)} of the rows timed their steps (see their "
            f"notes; each row's share is others_cpu_share in speed.json), so those steps may have run slower "
            f"than on an idle machine.")


def load_average() -> Optional[float]:
    """The 1-minute load average, or None where the platform has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def render(rows: List[Dict[str, Any]], header: str) -> str:
    frame = pd.DataFrame([{
        "Method": row["row_label"], "Settings": row["settings"], "ms/step": _cell(row["ms_per_step"], ".2f"),
        "samples/s": _cell(row["samples_per_second"], ".0f"),
        f"vs {row['ratio_to']}": _cell(row["ratio"], ".2f"),
        "inference img/s (final)": _cell(row["inference_images_per_second_final"], ".0f"),
        "inference img/s (checkpoint)": _cell(row["inference_images_per_second_checkpoint"], ".0f"),
        "peak MiB": _cell(row["peak_memory_bytes"], ".1f", 2**20),
        "notes": "; ".join(
            _noisy_steps(row)
            + [f"{k} ran eagerly: {v}" for k, v in row["compile_fallbacks"].items()]
            + [f"{k} not a CUDA graph: {v}" for k, v in row.get("capture_fallbacks", {}).items()]
            + ([f"{sum(row['graph_breaks'].values())} graph break(s)"] if row.get("graph_breaks") else [])
            + ([f"not measured: {row['error']}"] if row.get("error") else [])),
    } for row in rows])
    table = frame.to_markdown(index=False, disable_numparse=True, colalign=["left"] * 2 + ["right"] * 6 + ["left"])
    return f"{header}\n\n{table}\n"


def _release_earlier_rows(device: torch.device) -> None:
    """On CUDA, free what earlier rows left (a method in a reference cycle with its captured calls, a
    failed row's tensors), so this row's peak memory is its own; a device left broken by an earlier
    failure is this row's to report."""
    if device.type != "cuda":
        return
    gc.collect()
    try:
        torch.cuda.empty_cache()
    except RuntimeError:
        pass


def speed_main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    say = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    for flag, value in (("--batch-size", args.batch_size), ("--steps", args.steps), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} {value}: must be a whole number of at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    crowded = threads_beyond_cores(args.threads, "which lowers every row's measured throughput")
    if crowded:
        say(f"warning: {crowded}")
    if args.profile < 0:
        raise UsageError(f"--profile {args.profile}: must be 0 (no profile) or a number of operators to list")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device here")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    registry = load_plugins_saying(args.plugin, say)
    methods = distinct_methods(((name, registry.method(name), registry.method(name).resolve_params(given))
                                for name, given in parse_method_list(args.methods)), say)
    dataset_name, argument = parse_dataset_spec(args.dataset)
    dataset = registry.dataset(dataset_name)(argument, root=args.data_root, download=False)
    backbone = args.backbone or dataset.default_backbone
    check_backbone_name(backbone)
    grid = settings_grid(args, device.type)
    out = Path(args.out or Path("results") / f"speed-{dataset.name}-{datetime.now():%Y%m%d-%H%M%S}")
    check_output_directory(out, "--out")  # before any timing
    steps, plain_warmup = STEPS[device.type]
    steps = args.steps or steps
    inference_images = INFERENCE_IMAGES.get(device.type) or evaluation_batch_size(device, dataset.image_shape)
    task = random_task(dataset, backbone, device, max(args.batch_size, inference_images))
    rows = []
    planned = list(itertools.product(grid, methods))
    interrupted = False
    loads = []  # sampled before each row: a 1-minute average lags, so the highest one is kept
    try:
        for settings, (cls, params) in planned:
            loads.append(load_average())
            warmup = warmup_steps(plain_warmup, settings)
            say(f"{row_label_with_settings(cls, params)}, {settings.describe()}: {warmup} warm-up + {steps} timed "
                f"steps ...")
            _release_earlier_rows(device)
            try:
                row = measure(cls, params, task, settings, args.batch_size, steps, warmup, inference_images,
                              args.profile)
            except (UsageError, KeyboardInterrupt):
                raise
            except Exception as error:  # noqa: BLE001 - one method's failure is its row; the others still run
                row = failed_row(cls, params, settings, error)
                where = f" (raised at {row['error_at']})" if row.get("error_at") else ""
                say(f"{row_label_with_settings(cls, params)}, {settings.describe()}: not measured: "
                    f"{first_line(error)}{where}")
                rows.append(row)
            else:
                rows.append(row)
                say(f"{row_label_with_settings(cls, params)}, {settings.describe()}: {row_summary(row)}")
    except KeyboardInterrupt:  # keep the rows already measured
        interrupted = True
        say(f"interrupted after {len(rows)} of {len(planned)} row(s)")
        if not rows:
            return EXIT_INTERRUPTED
    add_ratios(rows)
    shape = "x".join(map(str, dataset.image_shape))
    kinds = list(dict.fromkeys(row["memory_kind"] for row in rows if "memory_kind" in row))
    pools_note = (f"; {WITH_GRAPH_POOLS}: max allocated plus the memory reserved for the CUDA graphs of the "
                  "recorded training updates, where their activations live between replays"
                  if WITH_GRAPH_POOLS in kinds else "")
    header = (f"# Speed: {dataset.display_name} shape ({shape}, {dataset.num_classes} classes, random images), "
              f"backbone {backbone}, batch {args.batch_size}, {device_name(device)}\n\n"
              f"Median of {steps} train steps after {warmup_text(grid, plain_warmup)}, the device synchronised "
              f"around each; inference: one pass over {inference_images} images at the method's final and "
              f"checkpoint settings; peak memory of the train steps "
              f"({'; '.join(MEMORY_WORDS.get(kind, kind) for kind in kinds)}{pools_note}). "
              f"\"vs {rows[0]['ratio_to'] if rows else 'backprop'}\": the row's samples/s over that method's with "
              f"the same settings (above 1 is faster).")
    loads.append(load_average())
    load = max((value for value in loads if value is not None), default=None)
    cpus = cpu_count()
    header += busy_machine_text(load, cpus, torch.get_num_threads()) or busy_rows_text(rows)
    if interrupted:
        header += (f" Interrupted: {len(rows)} of the {len(planned)} planned rows "
                   f"{'was' if len(rows) == 1 else 'were'} measured.")
    text = render(rows, header) + render_profiles(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.md").write_text(text)
    (out / "speed.json").write_text(json.dumps({"command": shlex.join(["noprop-bench", "speed", *argv]),
                                                "written_at": datetime.now().astimezone().isoformat(timespec="seconds"),
                                                "noprop_bench": __version__, "environment": environment(device),
                                                "device": device_name(device), "backbone": backbone,
                                                "dataset": dataset.spec, "batch_size": args.batch_size,
                                                "interrupted": interrupted, "rows_planned": len(planned),
                                                "load_average_1min_max": load, "cpus": cpus,
                                                "rows": rows}, indent=1, default=str))
    print(text)
    say(f"written to {out}/ (speed.md, speed.json)")
    if interrupted:
        return EXIT_INTERRUPTED
    return 1 if any(row.get("error") for row in rows) else 0
