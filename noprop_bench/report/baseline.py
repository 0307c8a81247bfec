"""Regression checks: compare a finished run with a committed baseline of accuracy and relative speed.

A baseline file is JSON with, per ``dataset / row`` (Table 1's rows), the test accuracy (mean; the pooled
s.e. over seeds x inference runs; and the s.e. over the per-seed means) and the training throughput
relative to a reference method measured in the same run (absolute seconds are never compared: shared machines are too
noisy). The tolerances are stored in the file.

The accuracy tolerance is ``max(accuracy_standard_errors x seed-level s.e., accuracy_floor_points)``, at most
``accuracy_cap_points``. The
seed-level s.e. is the spread between training runs; the pooled one treats inference runs of one
trained model as independent and understates it. Baselines saved before the seed-level s.e. existed
fall back to the pooled one.
"""

import json
import shlex
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pandas as pd

from ..errors import UsageError
from .records import assign_rows, speed_text

FORMAT_VERSION = 1
DEFAULT_TOLERANCE = {
    "accuracy_standard_errors": 3.0,  # accuracy may fall by this many s.e. over per-seed means ...
    "accuracy_floor_points": 1.0,  # ... or by this many percentage points, whichever is larger
    # ... but never by more than this: a sample budget with pinned threads is deterministic on the CPU, so
    # the same code reproduces the baseline exactly; a wide seed spread must not hide a real loss
    "accuracy_cap_points": 4.0,
    "throughput_ratio": 0.6,  # relative throughput may fall to this fraction of the baseline's
}


# what a run must share with the baseline to be compared with it; a baseline saved before a setting was
# stored is not checked on it
SETTINGS = ("budget", "backbone", "batch_size", "seeds", "inference_runs", "device_type", "speed", "augment",
            "threads")


def record_settings(records: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The :data:`SETTINGS` of a run's trials (all of them, finished ok or not)."""
    first = records[0]
    environment = first.get("environment") or {}
    device_type = str(environment.get("device", "cpu")).split(":")[0]
    return {"budget": first["budget"], "backbone": first["backbone"], "batch_size": first["batch_size"],
            "seeds": sorted({r["seed"] for r in records}),
            "inference_runs": max(int(r.get("inference_runs") or 1) for r in records),
            "device_type": device_type, "speed": speed_text(first),
            "augment": {r["dataset"]: r.get("augment") for r in records},
            # CPU results are deterministic only for a thread count; None on a GPU and in older records
            "threads": environment.get("threads") if device_type == "cpu" else None}


def spec_settings(specs: List[Any]) -> Dict[str, Any]:
    """The :data:`SETTINGS` of a run about to start, from its trial specs (as its records will hold them)."""
    first = specs[0]
    return {"budget": str(first.budget), "backbone": first.backbone, "batch_size": first.batch_size,
            "seeds": sorted({spec.seed for spec in specs}),
            "inference_runs": max(spec.inference_runs if spec.method.stochastic else 1 for spec in specs),
            "device_type": first.device.type, "speed": first.speed.describe(),
            "augment": {spec.dataset: spec.augment for spec in specs},
            "threads": None}  # known only where the trials run (a worker may set its own); checked after them


def _mean_se_n(values: List[float]) -> Tuple[float, float, int]:
    """Mean, standard error of the mean (0 for a single value) and count."""
    values = np.asarray(values, dtype=float)
    se = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
    return float(values.mean()), se, int(len(values))


def summarise(records: List[Dict[str, Any]], reference: Optional[str] = None) -> Dict[str, Any]:
    """Per-row accuracy and throughput of the ``ok`` trials; throughput relative to ``reference``."""
    ok = [r for r in records if r.get("status") == "ok"]
    if not ok:
        raise UsageError("no trial finished ok, so there is nothing to compare or save")
    rows: Dict[str, Dict[str, Any]] = {}
    # Table 1's rows: trials of one method with other parameters or training data are never pooled. Rows
    # are named from every trial of the run, so a configuration that diverged still keeps the others apart
    named = [r for r in records if r.get("row_label") and r.get("dataset")]
    labels = {id(record): label for record, label in zip(named, assign_rows(named))}
    for record, label in ((r, labels[id(r)]) for r in ok):
        row = rows.setdefault(f"{record['dataset']} / {label}", {
            "accuracies": [], "seed_means": [], "samples_per_second": [], "method": record["method"],
            "dataset": record["dataset"]})
        row["accuracies"].extend(record["test_acc_runs"])
        row["seed_means"].append(float(np.mean(record["test_acc_runs"])))
        row["samples_per_second"].append(record["samples_per_second"])
    reference = reference or ("backprop" if any(r["method"] == "backprop" for r in ok) else ok[0]["method"])
    speeds: Dict[str, List[float]] = {}
    for key, row in rows.items():
        row["accuracy_mean"], row["accuracy_se"], row["accuracy_n"] = _mean_se_n(row.pop("accuracies"))
        _, row["accuracy_seed_se"], row["accuracy_seeds"] = _mean_se_n(row.pop("seed_means"))
        row["samples_per_second"] = float(np.median(row["samples_per_second"]))
        if row["method"] == reference:
            speeds.setdefault(row["dataset"], []).append(row["samples_per_second"])
    for row in rows.values():
        # one reference row per dataset, or no relative speed: with two configurations of the reference
        # method, which one the others are relative to would be a guess
        base = speeds.get(row["dataset"], [])
        row["relative_throughput"] = row["samples_per_second"] / base[0] if len(base) == 1 else None
    return {"format": FORMAT_VERSION, "reference_method": reference, **record_settings(records), "rows": rows}


def save_baseline(records: List[Dict[str, Any]], path, command: str) -> Dict[str, Any]:
    """Write a baseline for the finished ``records`` to ``path``, with the default tolerances."""
    baseline = summarise(records)
    baseline["tolerance"] = dict(DEFAULT_TOLERANCE)
    baseline["command"] = command
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(baseline, indent=2, sort_keys=True) + "\n")
    return baseline


def load_baseline(path) -> Dict[str, Any]:
    try:
        baseline = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"--baseline {path}: no such file (write one with --save-baseline)") from None
    except json.JSONDecodeError as error:
        raise UsageError(f"--baseline {path}: not valid JSON ({error})") from None
    if not isinstance(baseline, dict) or "rows" not in baseline:
        raise UsageError(f"--baseline {path}: not a noprop-bench baseline (a JSON object with rows, written by "
                         f"--save-baseline)")
    if baseline.get("format") != FORMAT_VERSION:
        raise UsageError(f"--baseline {path}: baseline format {baseline.get('format')!r}, but this version of "
                         f"noprop-bench reads format {FORMAT_VERSION}; write it again with --save-baseline")
    return baseline


def check_compatible(baseline: Dict[str, Any], settings: Dict[str, Any]) -> None:
    """Refuse to compare a run whose :data:`SETTINGS` differ from the baseline's: another budget, backbone,
    batch size, set of seeds (a baseline's mean over seeds 0 and 1 says nothing of seed 0 alone), number of
    inference runs, device type, speed settings, augmentation or, on the CPU, torch threads. A setting the
    run does not know yet (None: the threads, before the trials) is not checked."""
    for key in SETTINGS:
        if key in baseline and settings[key] is not None and settings[key] != baseline[key]:
            raise UsageError(f"the run's {key.replace('_', ' ')} {settings[key]!r} differs from the baseline's "
                             f"{baseline[key]!r}; rerun with the baseline's settings "
                             f"({_without_save_baseline(baseline.get('command', ''))})")


def _without_save_baseline(command: str) -> str:
    """The baseline's command without its ``--save-baseline FILE``, which would overwrite the baseline."""
    try:
        words = shlex.split(command)
    except ValueError:
        return command
    kept, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word == "--save-baseline":
            skip = True
        elif not word.startswith("--save-baseline="):
            kept.append(word)
    return " ".join(shlex.quote(word) for word in kept)


def accuracy_allowance(then: Dict[str, Any], tolerance: Dict[str, Any]) -> float:
    """How many points a row's accuracy may fall below the baseline's mean.

    The baseline's own spread sets it (a noisy regressed run must not widen it): the s.e. over per-seed
    means, or the pooled s.e. for baselines saved before that was stored; never less than the floor and,
    where the baseline states one, never more than the cap.
    """
    spread = then.get("accuracy_seed_se", then["accuracy_se"])
    allowed = max(tolerance["accuracy_standard_errors"] * spread, tolerance["accuracy_floor_points"])
    cap = tolerance.get("accuracy_cap_points")  # None: no cap
    return allowed if cap is None else min(allowed, cap)


def compare(records: List[Dict[str, Any]], baseline: Dict[str, Any]) -> pd.DataFrame:
    """One row per baseline row: the figures then and now, and a verdict (``ok`` / what regressed)."""
    current = summarise(records, reference=baseline["reference_method"])
    tolerance = {**DEFAULT_TOLERANCE, **baseline.get("tolerance", {})}
    check_compatible(baseline, record_settings(records))
    table = []
    for key, then in baseline["rows"].items():
        now = current["rows"].get(key)
        problems = []
        if now is None:
            instead = [other for other, row in current["rows"].items() if other not in baseline["rows"]
                       and row["method"] == then.get("method") and row["dataset"] == then.get("dataset")]
            problems.append("missing from this run" + (f", which has {' and '.join(instead)} instead (the method "
                                                       f"with other parameters)" if instead else ""))
            now = {}
        else:
            allowed = accuracy_allowance(then, tolerance)
            if now["accuracy_mean"] < then["accuracy_mean"] - allowed:
                problems.append(f"accuracy fell {then['accuracy_mean'] - now['accuracy_mean']:.2f} points "
                                f"(allowed {allowed:.2f})")
            if then.get("relative_throughput") and now.get("relative_throughput") is not None:
                ratio = now["relative_throughput"] / then["relative_throughput"]
                if ratio < tolerance["throughput_ratio"]:
                    problems.append(f"throughput relative to {baseline['reference_method']} fell to "
                                    f"{ratio:.2f}x of the baseline's (allowed {tolerance['throughput_ratio']}x)")
        table.append({
            "row": key,
            "accuracy then": f"{then['accuracy_mean']:.2f} ± {then['accuracy_se']:.2f}",
            "allowed fall": f"{accuracy_allowance(then, tolerance):.2f}",
            "accuracy now": f"{now['accuracy_mean']:.2f} ± {now['accuracy_se']:.2f}" if now else "–",
            "rel. speed then": _ratio(then.get("relative_throughput")),
            "rel. speed now": _ratio(now.get("relative_throughput")),
            "verdict": "; ".join(problems) or "ok",
        })
    return pd.DataFrame(table)


def _ratio(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.2f}x"


def regressions(comparison: pd.DataFrame) -> pd.DataFrame:
    return comparison[comparison["verdict"] != "ok"]
