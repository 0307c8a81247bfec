"""Results as pandas DataFrames: one row per trial, per inference run, or per curve point.

``load_trials``, ``load_runs`` and ``load_curves`` read run directories through the same loader as every
report (:func:`records.load_records`: the record that stands for each trial, i.e. its last finished one, else
its last; a trial copied into two directories counted once; unreadable lines skipped with a warning), so a
frame and a table never disagree on what a run holds.

Fields a record does not have are missing values; fields this module does not know (added by newer
versions or by plugins) are kept: a nested object becomes dotted columns (``params.embedding``,
``environment.torch``, ``worker.host``), a list becomes its JSON text.
"""

import json
import os
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Sequence, Tuple

import numpy as np
import pandas as pd

from ..run.store import TRIALS_FILE
from .records import (SOURCE_FIELD, assign_rows, comparability, device_name, load_records, point_setting, setting_label,
                      speed_text)

# column -> (dtype, meaning); the columns of every frame come first, in this order
IDENTITY_COLUMNS: "OrderedDict[str, Tuple[str, str]]" = OrderedDict([
    ("run_dir", ("string", "the directory the trial was read from")),
    ("trial_id", ("string", "hash of everything that changes the trial's result")),
    ("status", ("string", "ok, failed, diverged or interrupted")),
    ("method", ("string", "method name, e.g. noprop_ct")),
    ("method_label", ("string", "method as the paper names it, e.g. NoProp-CT")),
    ("row_label", ("string", "the record's row label, e.g. NoProp-CT (prototype)")),
    ("row", ("string", "Table 1's row: row_label, plus the parameters that differ from the method's defaults "
                       "and what else differs when two setups of one method would share a cell")),
    ("family", ("string", "discrete-time or continuous-time")),
    ("dataset", ("string", "dataset spec, e.g. mnist5k")),
    ("dataset_label", ("string", "dataset as the tables show it")),
    ("dataset_content", ("string", "digest of the dataset's files, for a dataset whose files can change (an "
                                   "image folder); trials on other contents get their own column")),
    ("backbone", ("string", "timm backbone name")),
    ("seed", ("Int64", "training seed")),
    ("budget", ("string", "training budget per trial, e.g. 120s or 20000samples")),
    ("budget_unit", ("string", "seconds, samples or steps")),
    ("batch_size", ("Int64", "training batch size")),
    ("device", ("string", "device name as the tables group by, e.g. NVIDIA H100 or cpu (x86_64, ...)")),
    ("speed", ("string", "speed settings, e.g. eager fp32 or bf16, channels-last, compile default")),
    ("table", ("string", "which Table 1 table the trial is in: the settings its trials share (budget, backbone, "
                         "device when the budget is in seconds, batch size, speed); group by table, row and "
                         "dataset for Table 1's cells, and by device too for Table 2's")),
])

TRIAL_COLUMNS: "OrderedDict[str, Tuple[str, str]]" = OrderedDict([
    *IDENTITY_COLUMNS.items(),
    ("inference_runs", ("Int64", "evaluations of the final model asked for (stochastic methods use them all)")),
    ("test_acc_mean", ("float64", "mean test accuracy (%) over the inference runs")),
    ("train_acc_mean", ("float64", "mean train accuracy (%) over the inference runs, when measured")),
    ("steps", ("Int64", "training steps taken")),
    ("samples", ("Int64", "training samples seen")),
    ("epochs", ("float64", "samples / train-split size")),
    ("train_seconds", ("float64", "training time on the budget clock (s)")),
    ("eval_seconds", ("float64", "evaluation time, off the clock (s)")),
    ("setup_seconds", ("float64", "model construction time (s)")),
    ("data_load_seconds", ("float64", "dataset loading time (s)")),
    ("samples_per_second", ("float64", "training samples / training seconds")),
    ("seconds_per_epoch", ("float64", "train-split size / throughput (s); Table 2's s/epoch is the train-split "
                                      "size / the mean samples_per_second over seeds, not this column's mean")),
    ("peak_memory_bytes", ("Int64", "peak memory during training (bytes), of kind memory_kind")),
    ("memory_kind", ("string", "cuda_max_allocated, cuda_max_allocated_and_graph_pools or cpu_peak_rss")),
    ("params_total", ("Int64", "parameter count")),
    ("params_trainable", ("Int64", "trainable parameter count")),
    ("started_at", ("datetime64[ns, UTC]", "when the trial started")),
    ("finished_at", ("datetime64[ns, UTC]", "when the trial finished")),
    ("command", ("string", "the command that ran the trial")),
    ("error", ("string", "why a trial did not finish ok")),
    ("error_at", ("string", "file:line in function that raised a failed trial's error (the method's own code first)")),
])

RUN_COLUMNS: "OrderedDict[str, Tuple[str, str]]" = OrderedDict([
    *IDENTITY_COLUMNS.items(),
    ("evaluation", ("string", "final (the reported evaluation) or sweep (--inference-sweep)")),
    ("setting", ("string", "inference setting of a sweep point, e.g. heun 20; missing for final")),
    ("run", ("Int64", "inference run, 0 to inference_runs - 1")),
    ("test_acc", ("float64", "test accuracy (%) of this run")),
    ("train_acc", ("float64", "train accuracy (%) of this run, when measured")),
])

CURVE_COLUMNS: "OrderedDict[str, Tuple[str, str]]" = OrderedDict([
    *IDENTITY_COLUMNS.items(),
    ("point", ("Int64", "index of the point along the trial's curve")),
    ("final", ("boolean", "the end-of-budget evaluation (the last point)")),
    ("train_seconds", ("float64", "cumulative training time at the point (s)")),
    ("steps", ("Int64", "training steps so far")),
    ("samples", ("Int64", "training samples so far")),
    ("epochs", ("float64", "epochs so far")),
    ("test_acc", ("float64", "test accuracy (%) at the point")),
    ("train_loss", ("float64", "mean training loss since the previous point")),
    ("test_images", ("Int64", "test images the point evaluated (--checkpoint-size; all at the last point)")),
    ("setting", ("string", "inference setting of the point: final (Table 1's) at the end of budget, else the method's "
                           "checkpoint setting, e.g. heun 20 (default: predict's own)")),
])

# fields that become rows of their own frame, or derived columns, rather than trial columns
ROW_FIELDS = ("curve", "inference_sweep", "test_acc_runs", "train_acc_runs")


# -- turning values into typed columns --------------------------------------------------------------
def flatten(mapping: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"params": {"embedding": "prototype"}}`` -> ``{"params.embedding": "prototype"}``; lists become
    their JSON text, so every value is a scalar."""
    flat: Dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(value, default=str)
        else:
            flat[name] = value
    return flat


def _inferred_column(values: Sequence[Any]) -> pd.Series:
    """A column of unknown meaning: boolean, Int64, float64 or string, whichever holds every value; values
    of mixed kinds become strings (so the frame still writes to Parquet)."""
    present = [v for v in values if v is not None and not (isinstance(v, float) and np.isnan(v))]
    kinds = {bool if isinstance(v, bool) else int if isinstance(v, (int, np.integer)) else
             float if isinstance(v, (float, np.floating)) else str for v in present}
    if kinds == {bool}:
        return pd.Series(values, dtype="boolean")
    if kinds == {int}:
        return pd.Series(values, dtype="Int64")
    if kinds <= {int, float} and kinds:
        return pd.Series([np.nan if v is None else v for v in values], dtype="float64")
    return pd.Series([None if v is None else str(v) for v in values], dtype="string")


def _typed_column(values: Sequence[Any], dtype: str) -> pd.Series:
    """A documented column; a value that does not fit its dtype is a missing value, never an error."""
    if dtype.startswith("datetime64"):
        return pd.to_datetime(pd.Series(values, dtype=object), utc=True, errors="coerce").astype(dtype)
    if dtype == "string":
        return pd.Series([None if v is None else str(v) for v in values], dtype="string")
    if dtype == "boolean":
        return pd.Series([v if isinstance(v, (bool, np.bool_)) else None for v in values], dtype="boolean")
    numbers = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce")
    if dtype == "Int64":
        whole = numbers.where(numbers.isna() | (numbers == numbers.round()))
        return whole.astype("Int64")
    return numbers.astype("float64")


def build_frame(rows: List[Dict[str, Any]], columns: "OrderedDict[str, Tuple[str, str]]") -> pd.DataFrame:
    """A frame with the documented ``columns`` first (each of its dtype, present even when no row has
    it), then every other key any row has, in order of first appearance."""
    extra = list(OrderedDict.fromkeys(key for row in rows for key in row if key not in columns))
    data = OrderedDict()
    for name, (dtype, _) in columns.items():
        data[name] = _typed_column([row.get(name) for row in rows], dtype)
    for name in extra:
        data[name] = _inferred_column([row.get(name) for row in rows])
    return pd.DataFrame(data, index=pd.RangeIndex(len(rows)))


# -- rows -------------------------------------------------------------------------------------------
def _numbers(values: Any) -> List[float]:
    if not isinstance(values, list):
        return []
    return [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]


def _identity(record: Dict[str, Any], row: str) -> Dict[str, Any]:
    """Who a row belongs to: the identity columns, then the method's parameters as ``params.*``."""
    identity = {name: record.get(name) for name in IDENTITY_COLUMNS}
    identity.update(run_dir=record.get(SOURCE_FIELD), row=row, device=device_name(record),
                    speed=speed_text(record), table=table_text(record))
    params = record.get("params")
    identity.update(flatten(params if isinstance(params, dict) else {}, "params."))
    return identity


def table_text(record: Dict[str, Any]) -> str:
    """The ``table`` column: the settings a Table 1 table's trials share, e.g.
    ``budget 60s; backbone noprop_cnn; device cpu (...); batch size 128; eager fp32``."""
    budget, backbone, device, batch, speed = comparability(record)
    parts = [f"budget {budget}", f"backbone {backbone}", *([f"device {device}"] if device is not None else []),
             f"batch size {batch}", speed]
    return "; ".join(parts)


def trial_rows(record: Dict[str, Any], row: str) -> List[Dict[str, Any]]:
    test, train = _numbers(record.get("test_acc_runs")), _numbers(record.get("train_acc_runs"))
    fields = {k: v for k, v in record.items() if k not in ROW_FIELDS and k != SOURCE_FIELD}
    flat = _identity(record, row)
    flat.update((k, v) for k, v in flatten(fields).items() if k not in flat)
    flat["test_acc_mean"] = float(np.mean(test)) if test else None
    flat["train_acc_mean"] = float(np.mean(train)) if train else None
    return [flat]


def run_rows(record: Dict[str, Any], row: str) -> List[Dict[str, Any]]:
    if record.get("status") != "ok":
        return []
    identity = _identity(record, row)
    test, train = _numbers(record.get("test_acc_runs")), _numbers(record.get("train_acc_runs"))
    rows = [dict(identity, evaluation="final", run=index, test_acc=value,
                 train_acc=train[index] if len(train) == len(test) else None) for index, value in enumerate(test)]
    for point in record.get("inference_sweep") or []:
        if not isinstance(point, dict):
            continue
        setting = point.get("setting") if isinstance(point.get("setting"), dict) else {}
        sweep = dict(identity, evaluation="sweep", setting=setting_label(setting), **flatten(setting, "setting."))
        runs = _numbers(point.get("test_acc_runs"))
        rows += [dict(sweep, run=index, test_acc=value) for index, value in enumerate(runs)]
    return rows


def curve_rows(record: Dict[str, Any], row: str) -> List[Dict[str, Any]]:
    identity = _identity(record, row)
    points = [p for p in record.get("curve") or [] if isinstance(p, dict)]
    whole = record.get("test_size")  # records from before --checkpoint-size evaluated the whole split
    rows = []
    for index, point in enumerate(points):
        final = record.get("status") == "ok" and index == len(points) - 1
        rows.append(dict({"test_images": whole}, **flatten(point), **identity, point=index, final=final,
                         setting=point_setting(record, final)))
    return rows


def _frame(records: Iterable[Dict[str, Any]], make_rows: Callable, columns) -> pd.DataFrame:
    records = list(records)
    rows = assign_rows(records)
    return build_frame([line for record, row in zip(records, rows) for line in make_rows(record, row)], columns)


def trials_frame(records: Iterable[Dict[str, Any]]) -> pd.DataFrame:
    """:func:`load_trials` of records already loaded."""
    return _frame(records, trial_rows, TRIAL_COLUMNS)


def runs_frame(records: Iterable[Dict[str, Any]]) -> pd.DataFrame:
    """:func:`load_runs` of records already loaded."""
    return _frame(records, run_rows, RUN_COLUMNS)


def curves_frame(records: Iterable[Dict[str, Any]]) -> pd.DataFrame:
    """:func:`load_curves` of records already loaded."""
    return _frame(records, curve_rows, CURVE_COLUMNS)


# -- the public loaders -----------------------------------------------------------------------------
def run_directories(dirs: Sequence[Any]) -> List[Path]:
    """The run directories named by ``dirs``: paths, lists of paths (``load_trials(runs)`` as well as
    ``load_trials(*runs)``), or a run's ``trials.jsonl`` itself. A missing one is a :class:`FileNotFoundError`
    saying whether the path does not exist or holds no ``trials.jsonl`` (a mistyped path, not an empty run)."""
    paths: List[Path] = []
    for item in dirs:
        if isinstance(item, Iterable) and not isinstance(item, (str, bytes, os.PathLike)):
            paths.extend(run_directories(list(item)))
            continue
        path = Path(item)
        paths.append(path.parent if path.name == TRIALS_FILE and path.is_file() else path)
    if not paths:
        raise TypeError("give at least one run directory")
    problems = [f"{path} does not exist" if not path.exists() else f"{path} is a file, not a run directory"
                if not path.is_dir() else f"no {TRIALS_FILE} in {path}"
                for path in paths if not (path / TRIALS_FILE).is_file()]
    if problems:
        raise FileNotFoundError(f"{'; '.join(problems)}: each must be a run directory written by noprop-bench "
                                f"(the --out of a run, holding {TRIALS_FILE})")
    return paths


def read_records(dirs: Sequence[Any], warn: bool = True) -> Tuple[List[Dict[str, Any]], List[str]]:
    """The reportable records of the run directories (each tagged with the directory it came from; see
    :func:`run_directories` for what ``dirs`` may hold) and a note per thing skipped; each note is also a
    warning when ``warn``."""
    records, notes = load_records(run_directories(dirs))
    if warn:
        for note in notes:
            warnings.warn(note, stacklevel=3)
    return records, notes


def load_trials(*dirs) -> pd.DataFrame:
    """One row per trial of the run directories ``dirs`` (the record that stands for each trial: its last
    finished one, else its last), every status. ``dirs`` may also be one list of directories.

    Columns: :data:`TRIAL_COLUMNS` with their dtypes, then every other field of the records, nested
    objects as dotted columns (``params.embedding``, ``environment.torch``, ``method_metrics.gamma0``).
    """
    return trials_frame(read_records(dirs)[0])


def load_runs(*dirs) -> pd.DataFrame:
    """One row per inference run of every ``ok`` trial: the final evaluation (``evaluation == "final"``)
    and, with ``--inference-sweep``, each setting's runs (``"sweep"``, with ``setting.*`` columns).

    Columns: :data:`RUN_COLUMNS` with their dtypes, then the method's parameters (``params.*``) and the
    sweep settings' keys (``setting.*``).
    """
    return runs_frame(read_records(dirs)[0])


def load_curves(*dirs) -> pd.DataFrame:
    """One row per curve point (test evaluations during training, then the final one) of every trial.

    Columns: :data:`CURVE_COLUMNS` with their dtypes, then the method's parameters (``params.*``) and
    whatever else a method records per point (e.g. the adjoint's ``nfe_forward``)."""
    return curves_frame(read_records(dirs)[0])


def describe_columns(columns: "OrderedDict[str, Tuple[str, str]]") -> pd.DataFrame:
    """The documented columns of a frame as a small table (name, dtype, meaning)."""
    return pd.DataFrame([(name, dtype, meaning) for name, (dtype, meaning) in columns.items()],
                        columns=["column", "dtype", "meaning"])
