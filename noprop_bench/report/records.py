"""Trial records made ready for reports: loaded from run directories, checked, split into comparable groups.

Every report module, and the DataFrames of ``frames.py``, work from the same prepared pieces:
``load_records`` (what was read, and what was skipped and why), ``comparable_groups`` (trials that may
share a table), ``assign_rows`` (the paper's row order and labels) and ``dataset_columns`` (the paper's
column order).
"""

import json
import math
import re
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ..method import FAMILIES
from ..presets import PAPER_BUDGET
from ..errors import UsageError
from ..run.budget import Budget
from ..run.jobs import trial_label
from ..run.speed_settings import SETTING_FIELDS, SpeedSettings
from ..run.store import TRIALS_FILE, TrialStore, latest_per_trial, supersedes

PAPER_METHOD_ORDER = ("backprop_dt", "backprop", "noprop_dt", "adjoint", "noprop_ct", "noprop_fm")
EMBEDDING_ORDER = ("one-hot", "learned", "prototype")
FAMILY_HEADINGS = {"discrete-time": "Discrete-time", "continuous-time": "Continuous-time"}
DATASET_ORDER = ("mnist5k", "mnist", "fashion_mnist", "cifar10", "cifar100")
REQUIRED_FIELDS = ("status", "method", "row_label", "family", "dataset", "budget", "backbone", "seed")
# what the tables average where a record holds it: a value of another type is refused, not quietly left out
NUMBER_FIELDS = ("test_acc", "train_seconds", "eval_seconds", "samples_per_second", "steps", "samples", "epochs",
                 "batch_size", "peak_memory_bytes")
SOURCE_FIELD = "_source_dir"  # set by load_records: the directory a record was read from
# labels a method has since changed: (method, old row label) -> (method label, row label) now. The linear-head
# ``backprop`` was labelled like the paper's Backprop (one-hot) row, which is ``backprop_dt``.
RENAMED_LABELS = {
    ("backprop", "Backprop (one-hot)"): ("Backprop with linear head", "Backprop with linear head"),
}


# -- statistics -------------------------------------------------------------------------------------
def mean_and_standard_error(values: Iterable[float]) -> Tuple[float, float, int]:
    """Mean, standard error of the mean (sample s.d. / sqrt(n)) and n; s.e. is NaN for n < 2. The values are
    summed in sorted order, so the figures (and their last printed digit) do not depend on the order the
    trials were recorded in, which differs between executors."""
    values = np.sort(np.asarray(list(values), dtype=float))
    if len(values) == 0:
        return float("nan"), float("nan"), 0
    se = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
    return float(values.mean()), float(se), len(values)


def format_mean_se(values: Sequence[float], digits: int = 2) -> str:
    """``mean ± s.e.``; ``–`` without values; a single value is marked ``(n=1)`` (no error estimate)."""
    mean, se, n = mean_and_standard_error(values)
    if n == 0:
        return "–"
    if n == 1:
        return f"{mean:.{digits}f} (n=1)"
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


# -- loading and checking ---------------------------------------------------------------------------
def is_finite_number(value: Any) -> bool:
    """An int, or a finite float (NaN and infinities compare false with everything, so no check can hold
    them); never a bool. JSON integers of any size are finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or math.isfinite(value)


def check_record(record: Any) -> Optional[str]:
    """Why a record cannot be reported, or None when it can."""
    if not isinstance(record, dict):
        return "not a JSON object"
    missing = [field for field in REQUIRED_FIELDS if field not in record]
    if missing:
        return f"missing field(s) {', '.join(missing)}"
    if isinstance(record["seed"], bool) or not isinstance(record["seed"], int):
        return f"seed {record['seed']!r} is not a whole number"
    try:
        Budget.parse(str(record["budget"]))
    except UsageError:
        return f"budget {record['budget']!r} is not a budget noprop-bench writes"
    wrong = [field for field in NUMBER_FIELDS if record.get(field) is not None and not is_finite_number(record[field])]
    if wrong:  # a table would leave the value out of a mean without saying so
        return f"{', '.join(f'{field} {record[field]!r}' for field in wrong)}: not a number"
    if record["status"] == "ok":
        runs = record.get("test_acc_runs")
        if not isinstance(runs, list) or not runs or not all(is_finite_number(v) for v in runs):
            return "status ok but test_acc_runs is not a non-empty list of numbers"
    return None


def _describe(record: Any, number: int) -> str:
    if isinstance(record, dict) and record.get("trial_id"):
        return f"record {number} (trial {record['trial_id']})"
    return f"record {number}"


def current_labels(record: Dict[str, Any]) -> Dict[str, Any]:
    """``record`` with today's labels when its method has been relabelled since (a copy; else itself)."""
    renamed = RENAMED_LABELS.get((record["method"], record["row_label"]))
    if renamed is None:
        return record
    return {**record, "method_label": renamed[0], "row_label": renamed[1]}


def check_records(records: Iterable[Any], source: str = "records") -> Tuple[List[Dict[str, Any]], List[str]]:
    """The reportable records (with today's labels, and data that changed under one spec told apart), and a
    note for each one left out."""
    valid, notes = [], []
    for number, record in enumerate(records, 1):
        problem = check_record(record)
        if problem:
            notes.append(f"{source}: {_describe(record, number)}: {problem}; skipped")
        else:
            valid.append(current_labels(record))
    return apart_by_dataset_content(valid), notes


DATASET_SPEC_FIELD = "dataset_spec"  # the spec a record was run on, where ``dataset`` names its contents too


def apart_by_dataset_content(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Records of one dataset spec whose files differ between trials (an image folder changed between runs)
    get a dataset (and column label) of their own per content, e.g. ``imagefolder:/data/pets [data 1a2b3c4d]``,
    so trials on other data never share a cell. Copies; the rest are returned as they are."""
    contents: Dict[str, set] = {}
    for record in records:
        contents.setdefault(record.get(DATASET_SPEC_FIELD) or record["dataset"], set()).add(
            record.get("dataset_content"))
    changed = {spec for spec, seen in contents.items() if len(seen) > 1}
    if not changed:
        return records
    apart = []
    for record in records:
        if record["dataset"] in changed:  # not yet told apart (one that was keeps its spec in DATASET_SPEC_FIELD)
            spec, content = record["dataset"], record.get("dataset_content")
            tag = f"data {content[:8]}" if content else "data unrecorded"
            record = {**record, DATASET_SPEC_FIELD: spec, "dataset": f"{spec} [{tag}]",
                      "dataset_label": f"{record.get('dataset_label') or spec} ({tag})"}
        apart.append(record)
    return apart


def load_records(directories: Sequence[Any]) -> Tuple[List[Dict[str, Any]], List[str]]:
    """Reportable records of every ``DIR/trials.jsonl`` (the record that stands for each trial, see
    ``store.latest_per_trial``; its directory in ``SOURCE_FIELD``), and notes on what was skipped.

    A trial found in two directories (same id, same device) is counted once, from the last directory
    given, so a copied run cannot pass for extra seeds.
    """
    notes: List[str] = []
    merged: "OrderedDict[Tuple, Dict[str, Any]]" = OrderedDict()
    where: Dict[Tuple, str] = {}
    seen = set()
    for directory in directories:
        path = Path(directory)
        if not path.is_dir():
            notes.append(f"{path}: not a directory; skipped")
            continue
        if path.resolve() in seen:
            notes.append(f"{path}: given more than once; read once")
            continue
        seen.add(path.resolve())
        store = TrialStore(path)
        if not store.path.exists():
            notes.append(f"{path}: no {TRIALS_FILE}; skipped")
            continue
        raw, unreadable = store.read()
        notes.extend(f"{line}; skipped" for line in unreadable)
        valid, problems = check_records(raw, str(store.path))
        notes.extend(problems)
        if not raw and not unreadable:
            notes.append(f"{store.path}: empty")
        for record in latest_per_trial(valid):
            key = (record.get("trial_id") or id(record), device_name(record))
            if key in merged:
                if not supersedes(record, merged[key]):  # as within one file
                    notes.append(f"{path}: trial {key[0]} also in {where[key]}, finished there; that copy is used")
                    continue
                notes.append(f"{path}: trial {key[0]} also in {where[key]}; the copy in {path} is used")
                del merged[key]
            merged[key] = record
            where[key] = str(path)
            record[SOURCE_FIELD] = str(path)
    return list(merged.values()), notes


load_runs = load_records  # the former name


NO_RECORD = "no record (the run ended before this trial began, or was killed while it ran)"


def not_run_lines(directories: Sequence[Any], records: Sequence[Dict[str, Any]]) -> List[str]:
    """A line for each trial the last command into one of ``directories`` planned (its ``plan.json``) that
    left no record there: the run ended before it began (Ctrl-C), or was killed while it ran."""
    recorded = {str(r.get("trial_id")) for r in records}
    lines: List[str] = []
    for directory in dict.fromkeys(str(Path(d).resolve()) for d in directories):
        plan = TrialStore(directory).read_plan()
        for trial in (plan or {}).get("trials", []):
            if str(trial["trial_id"]) not in recorded:
                line = f"{trial['trial']} on {trial['dataset']}: {NO_RECORD}"
                if line not in lines:
                    lines.append(line)
    return lines


# -- grouping ---------------------------------------------------------------------------------------
def device_name(record: Dict[str, Any]) -> str:
    return str((record.get("environment") or {}).get("device_name", "unknown device"))


def budget_unit(record: Dict[str, Any]) -> str:
    """``seconds``, ``samples``, ``steps`` or ``epochs``; records without ``budget_unit`` are read from the
    budget string."""
    if record.get("budget_unit"):
        return str(record["budget_unit"])
    budget = str(record.get("budget", "")).strip()
    return next((unit for unit in ("samples", "steps", "epochs") if budget.endswith(unit)), "seconds")


def speed_text(record: Dict[str, Any]) -> str:
    """The trial's speed settings as caption text; records from before speed settings ran eager fp32."""
    fields = {key: value for key, value in (record.get("speed_settings") or {}).items()
              if key in SETTING_FIELDS}
    return SpeedSettings.from_dict(fields).describe()


def speed_setting_warnings(record: Dict[str, Any]) -> List[str]:
    """What of the trial's speed settings did not apply, which its table's caption cannot show: targets that
    fell back to eager (torch.compile or CUDA graph capture). Graph breaks are not listed: every built-in
    train step has some (dynamo leaves ``backward()`` to autograd, whose graphs AOTAutograd compiles), and
    the speed they cost is measured; the record keeps them (``speed_settings.graph_breaks``)."""
    settings = record.get("speed_settings") or {}
    if not isinstance(settings, dict):
        return []
    texts = [f"{target} ran eagerly under --compile {settings.get('compile')}: {reason}"
             for target, reason in (settings.get("compile_fallbacks") or {}).items()]
    texts += [f"{target} was not recorded as a CUDA graph: {reason}"
              for target, reason in (settings.get("capture_fallbacks") or {}).items()]
    return texts


def comparability(record: Dict[str, Any], by_device: Optional[bool] = None
                  ) -> Tuple[str, str, Optional[str], str, str]:
    """What must be equal for two trials to share a table: budget, backbone, device name, batch size,
    speed settings.

    ``by_device`` None splits by device only for budgets in seconds (a clock is fair on one device type
    only; samples or steps buy the same training anywhere), True always, False never; the device is None
    when it does not split.
    """
    split = budget_unit(record) not in ("samples", "steps", "epochs") if by_device is None else by_device
    return (budget_group(record), str(record.get("backbone")), device_name(record) if split else None,
            str(record.get("batch_size")), speed_text(record))


def budget_group(record: Dict[str, Any]) -> str:
    """The budget trials share a table by: ``paper`` for the paper's epochs (``100epochs (paper)`` and
    ``2epochs (paper)`` are both its protocol), else the budget itself (any other name stays part of it)."""
    budget = str(record.get("budget"))
    return PAPER_BUDGET if re.search(rf"\({PAPER_BUDGET}\)\s*$", budget) else budget


def comparable_groups(records: Iterable[Dict[str, Any]], by_device: Optional[bool] = None
                      ) -> List[List[Dict[str, Any]]]:
    """Records split by :func:`comparability`, in order of first appearance."""
    groups: "OrderedDict[Tuple, List[Dict[str, Any]]]" = OrderedDict()
    for record in records:
        groups.setdefault(comparability(record, by_device), []).append(record)
    return list(groups.values())


def group_distinctions(groups: Sequence[Sequence[Dict[str, Any]]], by_device: Optional[bool] = None) -> List[str]:
    """Per comparable group, the :func:`comparability` fields that tell it from the other groups (e.g.
    ``device NVIDIA H100``), for headings; empty strings when there is one group. A group not split by device
    (a budget in samples, steps or epochs) names no device."""
    keys = [comparability(group[0], by_device) for group in groups]
    names = ("budget", "backbone", "device", "batch size", "speed settings")
    varying = [i for i in range(len(names)) if len({key[i] for key in keys}) > 1]
    return [", ".join(f"{names[i]} {key[i]}" for i in varying if key[i] is not None) for key in keys]


def field_mean(records: Sequence[Dict[str, Any]], field: str, scale: float = 1.0) -> float:
    """The mean of ``field`` over the records that hold a number there, divided by ``scale``; NaN if none do."""
    values = [r.get(field) for r in records]
    values = [float(v) / scale for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return float(np.mean(sorted(values))) if values else float("nan")  # sorted: the same whatever the order


def seconds_per_epoch(records: Sequence[Dict[str, Any]]) -> float:
    """Train-set size / the mean throughput over ``records``, consistent with the samples/s shown beside it
    (a mean of each seed's ratio is not); the records' own figure where the set size is unknown."""
    sizes = [r["train_size"] for r in records if isinstance(r.get("train_size"), int) and r["train_size"] > 0]
    throughput = field_mean(records, "samples_per_second")
    if len(sizes) == len(records) and throughput > 0:
        return float(np.mean(sizes)) / throughput
    return field_mean(records, "seconds_per_epoch")


def memory_kind(record: Dict[str, Any]) -> str:
    """How the record's peak memory was measured (e.g. ``cuda_max_allocated``), or ``unknown``."""
    return str(record.get("memory_kind") or "unknown")


def device_counts(records: Sequence[Dict[str, Any]]) -> Counter:
    """Trials per device name, counted as the tables count them (a duplicate seed once)."""
    kept, _ = rows_without_duplicate_seeds(records)
    return Counter(device_name(record) for record in kept)


def _mixed_devices_text(record: Dict[str, Any]) -> str:
    unit = budget_unit(record)
    if unit in ("samples", "steps", "epochs"):
        return (f"accuracies share a {unit[:-1]} budget, but training times and throughput are not comparable "
                f"across devices.")
    return "the budget is in seconds, so neither accuracies nor training times are comparable across devices."


def settings_text(records: Sequence[Dict[str, Any]]) -> str:
    """The shared settings of a comparable group, for captions; a group that mixes devices says so."""
    budget, backbone, _, batch, speed = comparability(records[0])
    if budget == "paper":
        by_dataset: Dict[str, List[str]] = {}  # the paper's epochs depend on the dataset's kind
        for record in records:
            epochs = by_dataset.setdefault(str(record.get("dataset_label") or record["dataset"]), [])
            text = f"{record.get('method_label') or record['method']} {str(record['budget']).split(' ')[0]}"
            if text not in epochs:
                epochs.append(text)
        epochs = "; ".join(f"{dataset}: {', '.join(texts)}" if len(by_dataset) > 1 else ", ".join(texts)
                           for dataset, texts in by_dataset.items())
        budget = f"the paper's epochs per method ({epochs})"
    shared = f"Budget {budget} of training per trial{overshoot_text(records)}; backbone {backbone}; batch size {batch}"
    devices = device_counts(records)
    after = f"{training_data_text(records)}{per_block_epochs_text(records)}"
    if len(devices) == 1:
        return f"{shared}; device {next(iter(devices))}. Speed settings: {speed}.{after}"
    listed = ", ".join(f"{name} ({n} trial{'s' * (n != 1)})" for name, n in sorted(devices.items()))
    return (f"{shared}. Devices: {listed}: the group mixes device types; {_mixed_devices_text(records[0])} "
            f"Speed settings: {speed}.{after}")


def training_data_text(records: Sequence[Dict[str, Any]]) -> str:
    """A caption sentence on how the trials' training data were set up, when some were augmented
    (``--augment``, or the dataset's default) or had part held out (``--val-split``); "" otherwise. A setting
    that differs between datasets only is given per dataset; one that differs within a dataset splits its
    rows, which name it."""
    labels = dataset_columns(records)
    augments: "OrderedDict[str, set]" = OrderedDict()
    held_out: "OrderedDict[str, set]" = OrderedDict()
    for record in records:
        column = labels.get(record["dataset"], str(record["dataset"]))
        augments.setdefault(column, set()).add(str(record.get("augment") or "none"))
        held_out.setdefault(column, set()).add(float(record.get("val_split") or 0.0))
    parts = [_setting_text(augments, "none", "augmentation {}", str),
             _setting_text(held_out, 0.0, "{} of the training split held out for validation (not trained on)",
                           lambda share: f"{share * 100:g}%")]
    parts = [part for part in parts if part]
    return f" Training data: {'; '.join(parts)}." if parts else ""


def _setting_text(by_dataset: "OrderedDict[str, set]", default: Any, template: str,
                  value_text: Callable[[Any], str]) -> str:
    """One setting of :func:`training_data_text`: ``template`` filled with its values."""
    values = sorted(set().union(*by_dataset.values()))
    if values == [default]:
        return ""
    if all(len(found) == 1 for found in by_dataset.values()) and len(values) > 1:
        return ", ".join(f"{dataset}: {template.format(value_text(next(iter(found))))}"
                         for dataset, found in by_dataset.items())
    which = " (the rows name which)" if len(values) > 1 else ""
    return template.format(" or ".join(value_text(value) for value in values)) + which


def per_block_epochs_text(records: Sequence[Dict[str, Any]]) -> str:
    """For an epoch budget: what one epoch meant to each block of a method that trains one block per step
    (NoProp-DT's sequential and random schedules count epochs summed over their blocks); "" otherwise."""
    if budget_unit(records[0]) != "epochs":
        return ""
    per_label: "OrderedDict[str, Tuple[int, List[float]]]" = OrderedDict()
    for record, row in zip(records, assign_rows(records)):  # named as the table names its row
        metrics = record.get("method_metrics") or {}
        passes = metrics.get("passes_per_block")
        if metrics.get("blocks_trained_per_step") != 1 or not isinstance(passes, list) or not passes:
            continue
        _, means = per_label.setdefault(row, (len(passes), []))
        means.append(sum(passes) / len(passes))
    if not per_label:
        return ""
    listed = ", ".join(f"{label} {sum(means) / len(means):.2f} (of {blocks} blocks)"
                       for label, (blocks, means) in per_label.items())
    return (f" A method that trains one block per step counts epochs as passes summed over its blocks; passes "
            f"over the training split per block, on average: {listed}.")


SPENT_FIELDS = {"seconds": "train_seconds", "samples": "samples", "steps": "steps", "epochs": "epochs"}


def overshoot_text(records: Sequence[Dict[str, Any]]) -> str:
    """`` (trials spent 60.2-61.9 s: ...)`` when a trial of one budget spent more than 1% over it (a trial
    ends with the step that reaches its budget, so a slow step overshoots further); "" otherwise."""
    try:
        budget = Budget.parse(str(records[0].get("budget")))
    except UsageError:
        return ""
    if budget.name or any(str(r.get("budget")) != str(records[0].get("budget")) for r in records):
        return ""
    spent = [float(r[SPENT_FIELDS[budget.unit]]) for r in records
             if isinstance(r.get(SPENT_FIELDS[budget.unit]), (int, float))]
    if not spent or max(spent) <= 1.01 * budget.amount:
        return ""
    unit = {"seconds": "s"}.get(budget.unit, f" {budget.unit}")
    figure = {"seconds": "{:.1f}" if max(spent) >= 10 else "{:.2f}", "epochs": "{:.2f}"}.get(budget.unit, "{:.0f}")
    low, high = figure.format(min(spent)), figure.format(max(spent))
    amount = high if low == high else f"{low}-{high}"
    return f" (trials spent {amount}{unit}: each ends with the step that reaches the budget)"


def setting_label(setting: Any) -> str:
    """``{"solver": "heun", "steps": 40}`` -> ``heun 40``; other keys as ``key=value``."""
    if not isinstance(setting, dict):
        return str(setting)
    parts = [str(setting[k]) for k in ("solver", "steps") if k in setting]
    parts += [f"{k}={v}" for k, v in setting.items() if k not in ("solver", "steps")]
    return " ".join(parts) or "default"


def point_setting(record: Dict[str, Any], final: bool) -> Optional[str]:
    """The inference setting of one curve point: ``final`` (Table 1's) at the end of budget, else the method's
    checkpoint setting (``None`` in records made before it was stored)."""
    if final:
        return "final"
    setting = record.get("checkpoint_setting")
    return setting_label(setting) if isinstance(setting, dict) else None


def _settings_by_method(records: Sequence[Dict[str, Any]], setting_of) -> str:
    """``Method: setting, ...; Method: ...`` of the non-empty ``setting_of(record)`` dicts, in Table 1's order."""
    settings = OrderedDict()
    for record in sorted(records, key=row_sort_key):
        setting = setting_of(record)
        if setting:
            settings.setdefault(record.get("method_label") or record.get("method"), []).append(setting_label(setting))
    return "; ".join(f"{method}: {', '.join(dict.fromkeys(labels))}" for method, labels in settings.items())


def _final_setting(record: Dict[str, Any]) -> Dict[str, Any]:
    params = record.get("params") if isinstance(record.get("params"), dict) else {}
    setting = {key: params[key] for key in ("solver", "steps") if key in params}
    metrics = record.get("method_metrics") if isinstance(record.get("method_metrics"), dict) else {}
    if setting and metrics.get("steps", 0) is None and metrics.get("rtol") is not None:
        # an adaptive solver ignores its steps: its tolerances decide (as the method's metrics say)
        setting = {"solver": setting.get("solver"), "rtol": metrics["rtol"], "atol": metrics.get("atol")}
    return setting


def final_settings_text(records: Sequence[Dict[str, Any]]) -> str:
    """The inference setting of Table 1 for methods that integrate or sample over steps (their ``solver`` and
    ``steps`` parameters), e.g. ``NoProp-CT: stochastic 1000``; empty when no method has one."""
    return _settings_by_method(records, _final_setting)


def checkpoint_settings_text(records: Sequence[Dict[str, Any]]) -> str:
    """The inference settings of the curve's points before the last, where a method evaluates them
    otherwise than Table 1 (its ``checkpoint_setting``), e.g. ``NoProp-CT: heun 20``; empty if none does."""
    return _settings_by_method(records, lambda record: record.get("checkpoint_setting")
                               if isinstance(record.get("checkpoint_setting"), dict) else None)


def has_points_before_the_last(records: Sequence[Dict[str, Any]]) -> bool:
    """Whether some record's curve has a point before its last (none with ``--checkpoints 0``)."""
    return any(isinstance(r.get("curve"), list) and len(r["curve"]) > 1 for r in records)


def checkpoint_text(records: Sequence[Dict[str, Any]]) -> str:
    """Which test images the curve's points before the last saw (``--checkpoint-size``), and at which
    inference setting, for captions; empty when no curve has such points."""
    if not has_points_before_the_last(records):
        return ""
    sizes = sorted({(r.get("checkpoint_size"), r.get("test_size")) for r in records}, key=str)
    parts = []
    for checkpoint, whole in sizes:
        if checkpoint is None or checkpoint == whole:
            parts.append("the whole test split")
        else:
            parts.append(f"a fixed, stratified subset of {checkpoint} of the {whole} test images")
    settings = checkpoint_settings_text(records)
    settings = f", at the method's checkpoint setting of inference ({settings})" if settings else ""
    return (f"Points during training evaluate {' or '.join(dict.fromkeys(parts))}{settings}; the last point (end of "
            f"budget) evaluates the whole test split{', at the setting of Table 1' if settings else ''}.")


# -- rows and columns -------------------------------------------------------------------------------
def _order(value: Any, order: Sequence[Any]) -> int:
    return order.index(value) if value in order else len(order)


def _params(record: Dict[str, Any]) -> Dict[str, Any]:
    params = record.get("params")
    return params if isinstance(params, dict) else {}


def row_sort_key(record: Dict[str, Any]) -> Tuple:
    """The paper's order: family, then Backprop, NoProp-DT, Adjoint, NoProp-CT, NoProp-FM, then others
    alphabetically; within a method one-hot, dim=20 (learned), prototype."""
    embedding = _params(record).get("embedding", "one-hot")
    return (_order(record["family"], FAMILIES), str(record["family"]),
            _order(record["method"], PAPER_METHOD_ORDER), str(record["method"]),
            _order(embedding, EMBEDDING_ORDER), str(record["row_label"]))


def _variant(record: Dict[str, Any]) -> Dict[str, Any]:
    """The method (two plugins may share a label), its parameters and how its training data were set up
    (``--augment``, ``--val-split``; records from before ``--val-split`` held out nothing): what tells two trials
    of one row apart (and :func:`_apart_by_inference_runs`)."""
    return {**_params(record), "method": record["method"], "augment": record.get("augment"),
            "val_split": float(record.get("val_split") or 0.0)}


def _apart_by_inference_runs(records: Sequence[Dict[str, Any]], rows: List[str]) -> List[str]:
    """``rows`` with the number of inference runs added to every row whose ``ok`` trials pooled different
    numbers (a mean of 2 runs per seed and one of 5 are not one statistic; a method that does not sample
    records 1 whatever ``--inference-runs`` said), on every dataset, as :func:`assign_rows` names clashes. A
    trial that did not finish ok holds no value: it is named by its number when it records one (a record the
    host wrote for a lost trial does not)."""
    counts: Dict[str, set] = {}
    for record, row in zip(records, rows):
        if record.get("status") == "ok":
            counts.setdefault(row, set()).add(int(record.get("inference_runs") or 1))
    apart = []
    for record, row in zip(records, rows):
        runs = record.get("inference_runs")
        runs = runs or 1 if record.get("status") == "ok" else runs
        if len(counts.get(row, ())) > 1 and runs is not None:
            named = f"inference_runs={int(runs)}"
            # into the bracket of parameters the row label got, if any (a label may end in "]" of its own)
            own = str(record.get("row_label") or "")
            row = f"{row[:-1]}, {named}]" if row.endswith("]") and row != own else f"{row} [{named}]"
        apart.append(row)
    return apart


def newest_per_method(records: Iterable[Dict[str, Any]], field: str) -> Dict[str, Dict[str, Any]]:
    """Each method's ``field`` (a mapping: its code identity, its parameter defaults) as stated by the last
    finished of its records that holds one."""
    newest: Dict[str, Dict[str, Any]] = {}
    for record in sorted(records, key=lambda r: str(r.get("finished_at", ""))):
        if isinstance(record.get(field), dict) and record[field]:
            newest[record["method"]] = record[field]
    return newest


def assign_rows(records: Sequence[Dict[str, Any]]) -> List[str]:
    """A row label per record: ``row_label`` with the parameters that differ from the defaults its method
    had (:func:`~noprop_bench.run.jobs.trial_label`: a record that stored them alone decides its label, so
    every output labels it alike; an older one is labelled against the newest defaults its method's
    records state), plus what differs when two trials would otherwise share a cell (same label and dataset)
    with different methods, parameters or training data (``--augment``, ``--val-split``)."""
    stated = newest_per_method(records, "param_defaults")  # for records made before the defaults were stored
    labels = [trial_label(record, stated.get(record["method"])) for record in records]
    variants_in_cell: Dict[Tuple[str, str], set] = {}
    for record, label in zip(records, labels):
        variants_in_cell.setdefault((label, record["dataset"]), set()).add(
            json.dumps(_variant(record), sort_keys=True, default=str))
    clashing = {label for (label, _), variants in variants_in_cell.items() if len(variants) > 1}
    differing: Dict[str, List[str]] = {}
    for label in clashing:
        variants = [_variant(r) for r, own in zip(records, labels) if own == label]
        keys = sorted({k for v in variants for k in v})
        differing[label] = [k for k in keys if len({json.dumps(v.get(k), default=str) for v in variants}) > 1]
    rows = []
    for record, label in zip(records, labels):
        if label in clashing:  # a parameter the record lacks (added to its method since) is left unnamed
            variant = _variant(record)
            named = [f"{k}={variant[k]}" for k in differing[label] if k in variant]
            label += f" [{', '.join(named)}]" if named else ""
        rows.append(label)
    return _apart_by_inference_runs(records, rows)


def ordered_rows(records: Sequence[Dict[str, Any]], rows: Sequence[str]) -> List[Tuple[str, str]]:
    """Unique ``(family, row)`` pairs in the paper's order."""
    first: "OrderedDict[str, Dict[str, Any]]" = OrderedDict()
    for record, row in zip(records, rows):
        first.setdefault(row, record)
    ordered = sorted(first.items(), key=lambda item: (row_sort_key(item[1]), item[0]))
    return [(record["family"], row) for row, record in ordered]


def family_heading(family: str) -> str:
    return f"**{FAMILY_HEADINGS.get(family, family)}**"


def dataset_columns(records: Iterable[Dict[str, Any]]) -> "OrderedDict[str, str]":
    """``{dataset spec: column label}`` in the paper's order (MNIST, CIFAR-10, CIFAR-100), others after."""
    labels: Dict[str, str] = {}
    for record in records:
        labels.setdefault(record["dataset"], str(record.get("dataset_label") or record["dataset"]))
    specs = sorted(labels, key=lambda spec: (_order(spec.split(":")[0], DATASET_ORDER), spec))
    shown = [labels[spec] for spec in specs]
    return OrderedDict((spec, labels[spec] if shown.count(labels[spec]) == 1 else f"{labels[spec]} ({spec})")
                       for spec in specs)


def drop_duplicate_seeds(records: Sequence[Dict[str, Any]], rows: Sequence[str]
                         ) -> Tuple[List[Dict[str, Any]], List[str], List[str]]:
    """Keep the last trial of each (row, dataset, seed): a seed counted twice would shrink the error bar."""
    last: "OrderedDict[Tuple, int]" = OrderedDict()
    notes = []
    for index, (record, row) in enumerate(zip(records, rows)):
        key = (row, record["dataset"], record["seed"])
        if key in last:
            notes.append(f"{row} on {record['dataset']} seed {record['seed']}: more than one trial "
                         f"(a rerun under other options, say); only the last is used")
        last[key] = index
    keep = sorted(last.values())
    return [records[i] for i in keep], [rows[i] for i in keep], notes


def rows_without_duplicate_seeds(records: Sequence[Dict[str, Any]]) -> Tuple[List[Dict[str, Any]], List[str]]:
    """The records a table is made of (of a seed given twice in a row and dataset, the last) and their rows."""
    kept, rows, _ = drop_duplicate_seeds(records, assign_rows(records))
    return kept, rows


def markdown(frame, align_first_left: bool = True) -> str:
    """GitHub markdown for a frame of strings (no number re-formatting by tabulate); a ``|`` in a heading or
    cell (a folder's name, say) is escaped, as it would end the cell."""
    colalign = (["left"] if align_first_left else ["right"]) + ["right"] * (frame.shape[1] - 1)
    escaped = frame.rename(columns=lambda name: str(name).replace("|", "\\|"))
    escaped = escaped.apply(lambda column: column.map(lambda v: v.replace("|", "\\|") if isinstance(v, str) else v))
    return escaped.to_markdown(index=False, colalign=colalign, disable_numparse=True)
