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
from ..method import settings_suffix
from .records import assign_rows, is_finite_number, mean_and_standard_error, speed_text

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
SETTINGS = ("datasets", "budget", "backbone", "batch_size", "seeds", "inference_runs", "device_type", "speed",
            "augment", "threads")


def _one_or_all(values) -> Any:
    """The value all of ``values`` share (unknown ones, None, left out), or all of them (sorted) where they
    differ, which no baseline holds; None when none is known."""
    distinct = sorted({value for value in values if value is not None})
    return (distinct[0] if len(distinct) == 1 else distinct) if distinct else None


def record_settings(records: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The :data:`SETTINGS` of a run's trials (all of them, finished ok or not)."""
    first = records[0]
    environment = first.get("environment") or {}
    device_type = str(environment.get("device", "cpu")).split(":")[0]
    sampled = [int(r.get("inference_runs") or 1) for r in records if r.get("stochastic")]
    return {"datasets": sorted({r["dataset"] for r in records}),
            "budget": first["budget"], "backbone": first["backbone"], "batch_size": first["batch_size"],
            "seeds": sorted({r["seed"] for r in records}),
            # the runs of methods that sample; None where none does (others are evaluated once)
            "inference_runs": max(sampled) if sampled else None,
            "device_type": device_type, "speed": speed_text(first),
            "augment": {r["dataset"]: r.get("augment") for r in records},
            # CPU results are deterministic only for a thread count (a resumed run may mix them: all are
            # listed then); None on a GPU and in older records
            "threads": _one_or_all((r.get("environment") or {}).get("threads") for r in records)
            if device_type == "cpu" else None}


def spec_settings(specs: List[Any], threads: Optional[int] = None) -> Dict[str, Any]:
    """The :data:`SETTINGS` of a run about to start, from its trial specs (as its records will hold them);
    ``threads`` where the executor knows them before the trials run (None: checked after them)."""
    first = specs[0]
    sampled = [spec.inference_runs for spec in specs if spec.method.stochastic]
    return {"datasets": sorted({spec.dataset for spec in specs}),
            "budget": str(first.budget), "backbone": first.backbone, "batch_size": first.batch_size,
            "seeds": sorted({spec.seed for spec in specs}),
            "inference_runs": max(sampled) if sampled else None,
            "device_type": first.device.type, "speed": first.speed.describe(),
            "augment": {spec.dataset: spec.augment for spec in specs},
            "threads": threads if first.device.type == "cpu" else None}


NOT_CHECKED = "not in the baseline: not checked"

# what a run is not refused for, but is told of: results reproduce exactly only where these are the same
ENVIRONMENT = {"torch": "torch", "cpu_capability": "CPU kernels", "device_name": "GPU"}


def record_environment(records: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The torch version and the machine's kind its trials ran with: the instruction set of torch's CPU kernels
    on the CPU, the GPU's name on a GPU; a field the trials disagree on lists every value, one they lack is
    left out."""
    environments = [r.get("environment") or {} for r in records]
    on_gpu = any(str(e.get("device", "cpu")).split(":")[0] != "cpu" for e in environments)
    fields = [field for field in ENVIRONMENT if field != ("cpu_capability" if on_gpu else "device_name")]
    shared = {field: _one_or_all(e.get(field) for e in environments) for field in fields}
    return {field: value for field, value in shared.items() if value is not None}


def environment_differences(baseline: Dict[str, Any], records: List[Dict[str, Any]]) -> List[str]:
    """What differs between the baseline's environment and the run's, e.g. ``torch 2.11.0 (baseline:
    2.14.1)``; empty where nothing known to both differs (baselines saved before this was stored know none)."""
    then, now = baseline.get("environment") or {}, record_environment(records)
    return [f"{ENVIRONMENT[field]} {_listed(now[field])} (baseline: {_listed(then[field])})"
            for field in ENVIRONMENT if field in then and field in now and then[field] != now[field]]


def _listed(value: Any) -> str:
    return " and ".join(map(str, value)) if isinstance(value, list) else str(value)


def _mean_se_n(values: List[float]) -> Tuple[float, float, int]:
    """Mean, standard error of the mean (0 for a single value) and count, as Table 1 computes them (so the
    two print the same digits)."""
    mean, se, count = mean_and_standard_error(values)
    return mean, se if count > 1 else 0.0, count


def _row_keys(records: List[Dict[str, Any]]) -> Dict[int, str]:
    """``dataset / row`` of each record (by ``id``): Table 1's rows, so trials of one method with other
    parameters or training data are never pooled. Rows are named from every trial of the run, so a
    configuration that diverged still keeps the others apart."""
    named = [r for r in records if r.get("row_label") and r.get("dataset")]
    return {id(record): f"{record['dataset']} / {label}" for record, label in zip(named, assign_rows(named))}


def not_ok_rows(records: List[Dict[str, Any]]) -> Dict[str, str]:
    """Per row with trials that did not finish ok: what became of them, e.g. ``diverged (2 of 2 trials)``."""
    keys = _row_keys(records)
    outcomes: Dict[str, List[str]] = {}
    for record in records:
        if id(record) in keys:
            outcomes.setdefault(keys[id(record)], []).append(str(record.get("status")))
    return {key: ", ".join(f"{status} ({statuses.count(status)} of {len(statuses)} trials)"
                           for status in dict.fromkeys(statuses) if status != "ok")
            for key, statuses in outcomes.items() if any(status != "ok" for status in statuses)}


def _at_defaults(record: Dict[str, Any]) -> bool:
    """Whether a trial ran its method at the defaults it stated (records made before they were stored: yes)."""
    defaults, params = record.get("param_defaults"), record.get("params")
    return not isinstance(defaults, dict) or not isinstance(params, dict) or settings_suffix(params, defaults) == ""


def summarise(records: List[Dict[str, Any]], reference: Optional[str] = None) -> Dict[str, Any]:
    """Per-row accuracy and throughput of the ``ok`` trials; throughput relative to the row of ``reference``
    at its default parameters (or to its only row)."""
    ok = [r for r in records if r.get("status") == "ok"]
    if not ok:
        raise UsageError("no trial finished ok, so there is nothing to compare or save")
    rows: Dict[str, Dict[str, Any]] = {}
    keys = _row_keys(records)
    for record, key in ((r, keys[id(r)]) for r in ok):
        row = rows.setdefault(key, {
            "accuracies": [], "seed_means": [], "samples_per_second": [], "method": record["method"],
            "dataset": record["dataset"], "defaults": True})
        row["defaults"] &= _at_defaults(record)
        row["accuracies"].extend(record["test_acc_runs"])
        row["seed_means"].append(float(np.mean(record["test_acc_runs"])))
        row["samples_per_second"].append(record["samples_per_second"])
    reference = reference or ("backprop" if any(r["method"] == "backprop" for r in ok) else ok[0]["method"])
    speeds: Dict[str, List[float]] = {}
    for key, row in rows.items():
        row["accuracy_mean"], row["accuracy_se"], row["accuracy_n"] = _mean_se_n(row.pop("accuracies"))
        _, row["accuracy_seed_se"], row["accuracy_seeds"] = _mean_se_n(row.pop("seed_means"))
        row["samples_per_second"] = float(np.median(row["samples_per_second"]))
        at_defaults = row.pop("defaults")
        if row["method"] == reference:
            speeds.setdefault(row["dataset"], []).append((not at_defaults, row["samples_per_second"]))
    for row in rows.values():
        # the reference method at its default parameters; failing that, its one configuration: with two
        # others, which one the rest are relative to would be a guess
        base = sorted(speeds.get(row["dataset"], []))
        chosen = base[0][1] if base and (len(base) == 1 or base[0][0] != base[1][0]) else None
        row["relative_throughput"] = row["samples_per_second"] / chosen if chosen else None
    return {"format": FORMAT_VERSION, "reference_method": reference, **record_settings(records), "rows": rows}


def save_baseline(records: List[Dict[str, Any]], path, command: str) -> Dict[str, Any]:
    """Write a baseline for the finished ``records`` to ``path``, with the default tolerances. Every trial
    must have finished ok: a row left out (it diverged, say) would no longer be checked by anyone."""
    unfinished = not_ok_rows(records)
    if unfinished:
        raise UsageError("--save-baseline: every trial must finish ok, or its row would silently leave the "
                         "baseline; not ok: " + "; ".join(f"{key}: {what}" for key, what in unfinished.items())
                         + " (a diverged trial is kept as finished: save from another --out, or other settings)")
    threads = record_settings(records)["threads"]
    if isinstance(threads, list):
        raise UsageError(f"--save-baseline: the trials ran with {' and '.join(map(str, threads))} torch threads (a "
                         f"run resumed with another --threads); CPU results reproduce only for one: save from a run "
                         f"in a new --out with --threads")
    baseline = summarise(records)
    for row in baseline["rows"].values():  # 6 significant digits: far finer than any tolerance, readable diffs
        row.update({key: float(f"{value:.6g}") for key, value in row.items() if isinstance(value, float)})
    baseline["tolerance"] = dict(DEFAULT_TOLERANCE)
    baseline["command"] = command
    baseline["environment"] = record_environment(records)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(baseline, indent=2, sort_keys=True) + "\n")
    return baseline


def load_baseline(path) -> Dict[str, Any]:
    try:
        baseline = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"--baseline {path}: no such file (write one with --save-baseline)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"--baseline {path}: not valid JSON ({error})") from None
    except OSError as error:  # a directory, no permission
        raise UsageError(f"--baseline {path}: cannot be read ({error.strerror or error})") from None
    if not isinstance(baseline, dict) or "rows" not in baseline:
        raise UsageError(f"--baseline {path}: not a noprop-bench baseline (a JSON object with rows, written by "
                         f"--save-baseline)")
    if baseline.get("format") != FORMAT_VERSION:
        raise UsageError(f"--baseline {path}: baseline format {baseline.get('format')!r}, but this version of "
                         f"noprop-bench reads format {FORMAT_VERSION}; write it again with --save-baseline")
    problem = _malformed(baseline)
    if problem:
        raise UsageError(f"--baseline {path}: {problem} (a hand-edited baseline must keep the fields "
                         f"--save-baseline writes)")
    return baseline


def _malformed(baseline: Dict[str, Any]) -> Optional[str]:
    """What makes a baseline unusable, found before training rather than after it; None when nothing."""
    rows = baseline.get("rows")
    if not isinstance(rows, dict) or not rows:
        return "rows must be a non-empty object of 'dataset / row' entries"
    if not isinstance(baseline.get("reference_method"), str):
        return "reference_method must be a method name"
    for key, row in rows.items():
        if not isinstance(row, dict):
            return f"row {key!r} must be an object"
        for field in ("accuracy_mean", "accuracy_se"):
            if not is_finite_number(row.get(field)):
                return f"row {key!r}: {field} must be a finite number"
        for field in ("accuracy_se", "accuracy_seed_se", "relative_throughput"):
            if is_finite_number(row.get(field)) and row[field] < 0:
                return f"row {key!r}: {field} must not be negative"
        for field in ("method", "dataset"):
            if not isinstance(row.get(field), str):
                return f"row {key!r}: {field} must be a string"
        for field in ("accuracy_seed_se", "relative_throughput"):
            if row.get(field) is not None and not is_finite_number(row[field]):
                return f"row {key!r}: {field} must be a finite number or null"
    if not isinstance(baseline.get("environment", {}), dict):
        return "environment must be an object"
    tolerance = baseline.get("tolerance", {})
    if not isinstance(tolerance, dict):
        return "tolerance must be an object"
    for field, value in tolerance.items():
        no_cap = value is None and field == "accuracy_cap_points"
        if field in DEFAULT_TOLERANCE and not is_finite_number(value) and not no_cap:
            return f"tolerance {field} must be a finite number"
        if field in DEFAULT_TOLERANCE and is_finite_number(value) and value < 0:
            return f"tolerance {field} must not be negative"
    if is_finite_number(tolerance.get("throughput_ratio")) and tolerance["throughput_ratio"] > 1:
        return "tolerance throughput_ratio must be at most 1 (0 checks no throughput)"
    return None


def check_compatible(baseline: Dict[str, Any], settings: Dict[str, Any]) -> None:
    """Refuse to compare a run whose :data:`SETTINGS` differ from the baseline's: another budget, backbone,
    batch size, set of seeds (a baseline's mean over seeds 0 and 1 says nothing of seed 0 alone), number of
    inference runs, device type, speed settings, augmentation or, on the CPU, torch threads. A setting the
    run does not know yet (None: the threads, before the trials) or that does not apply (inference runs
    where no method samples) is not checked."""
    for key in SETTINGS:
        if baseline.get(key) is not None and settings[key] is not None and settings[key] != baseline[key]:
            spelling = (" (a dataset read from a folder is named by its absolute path: the folder must be at the "
                        "baseline's path, or save a baseline for this one)" if key == "datasets" and all(
                            ":" in "".join(side) for side in (settings[key], baseline[key])) else "")
            command = _without_save_baseline(baseline.get("command") or "")
            raise UsageError(f"the run's {key.replace('_', ' ')} {settings[key]!r} differs from the baseline's "
                             f"{baseline[key]!r}{spelling}; rerun with the baseline's settings"
                             f"{f' ({command})' if command else ''}")


def _without_save_baseline(command: str) -> str:
    """The baseline's command without its ``--save-baseline FILE``, which would overwrite the baseline, and
    its ``--out DIR``, where a rerun would skip every trial and compare the baseline with itself."""
    try:
        words = shlex.split(command)
    except ValueError:
        return command
    kept, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word in ("--save-baseline", "--out"):
            skip = True
        elif not word.startswith(("--save-baseline=", "--out=")):
            kept.append(word)
    return shlex.join(kept)


def accuracy_allowance(then: Dict[str, Any], tolerance: Dict[str, Any]) -> float:
    """How many points a row's accuracy may fall below the baseline's mean.

    The baseline's own spread sets it (a noisy regressed run must not widen it): the s.e. over per-seed
    means, or the pooled s.e. for baselines saved before that was stored; never less than the floor and,
    where the baseline states one, never more than the cap.
    """
    spread = then.get("accuracy_seed_se")
    spread = then["accuracy_se"] if spread is None else spread
    allowed = max(tolerance["accuracy_standard_errors"] * spread, tolerance["accuracy_floor_points"])
    cap = tolerance.get("accuracy_cap_points")  # None: no cap
    return allowed if cap is None else min(allowed, cap)


def compare(records: List[Dict[str, Any]], baseline: Dict[str, Any]) -> pd.DataFrame:
    """One row per baseline row: the figures then and now, and a verdict (``ok`` / what regressed)."""
    ok = any(record.get("status") == "ok" for record in records)  # else every row fails as not finished ok
    current = summarise(records, reference=baseline["reference_method"]) if ok else {"rows": {}}
    tolerance = {**DEFAULT_TOLERANCE, **baseline.get("tolerance", {})}
    check_compatible(baseline, record_settings(records))
    unfinished = not_ok_rows(records)
    table = []
    for key, then in baseline["rows"].items():
        now = current["rows"].get(key)
        problems = []
        if now is None and key in unfinished:
            problems.append(f"no trial finished ok in this run: {unfinished[key]}")
            now = {}
        elif now is None:
            instead = [other for other, row in current["rows"].items() if other not in baseline["rows"]
                       and row["method"] == then.get("method") and row["dataset"] == then.get("dataset")]
            problems.append("missing from this run" + (f", which has {' and '.join(instead)} instead (the method "
                                                       f"with other parameters)" if instead else ""))
            now = {}
        else:
            if key in unfinished:
                problems.append(f"not every trial finished ok in this run: {unfinished[key]}")
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
            "allowed fall (points)": f"{accuracy_allowance(then, tolerance):.2f}",
            "accuracy now": f"{now['accuracy_mean']:.2f} ± {now['accuracy_se']:.2f}" if now else "–",
            "rel. speed then": _ratio(then.get("relative_throughput")),
            "rel. speed now": _ratio(now.get("relative_throughput")),
            "verdict": "; ".join(problems) or "ok",
        })
    for key in dict.fromkeys([*current["rows"], *unfinished]):
        if key not in baseline["rows"]:
            now = current["rows"].get(key, {})
            table.append({"row": key, "accuracy then": "–", "allowed fall (points)": "–",
                          "accuracy now": f"{now['accuracy_mean']:.2f} ± {now['accuracy_se']:.2f}" if now else "–",
                          "rel. speed then": "–", "rel. speed now": _ratio(now.get("relative_throughput")),
                          "verdict": NOT_CHECKED + (f" ({unfinished[key]})" if key in unfinished else "")})
    return pd.DataFrame(table)


def _ratio(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.2f}x"


def regressions(comparison: pd.DataFrame) -> pd.DataFrame:
    """The rows that fail the check (a row the baseline does not have is listed, not failed)."""
    return comparison[(comparison["verdict"] != "ok") & ~comparison["verdict"].str.startswith(NOT_CHECKED)]
