"""Tables in the paper's format, rendered from trial records with pandas and tabulate."""

from typing import Any, Dict, Iterable, List, Tuple

import numpy as np
import pandas as pd

from .method import FAMILIES

PAPER_METHOD_ORDER = ("backprop", "noprop_dt", "adjoint", "noprop_ct", "noprop_fm")
EMBEDDING_ORDER = ("one-hot", "learned", "prototype")
FAMILY_HEADINGS = {"discrete-time": "Discrete-time", "continuous-time": "Continuous-time"}
COMPARABILITY_KEYS = ("budget", "backbone", "device_name", "batch_size")


def mean_and_standard_error(values: Iterable[float]) -> Tuple[float, float, int]:
    values = np.asarray(list(values), dtype=float)
    if len(values) == 0:
        return float("nan"), float("nan"), 0
    se = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else 0.0
    return float(values.mean()), float(se), len(values)


def format_cell(values: List[float]) -> str:
    mean, se, n = mean_and_standard_error(values)
    return "–" if n == 0 else f"{mean:.2f} ± {se:.2f}"


def _comparability(record: Dict[str, Any]) -> Tuple:
    return (record.get("budget"), record.get("backbone"),
            record.get("environment", {}).get("device_name"), record.get("batch_size"))


def _row_sort_key(record: Dict[str, Any]):
    method = record["method"]
    embedding = record.get("params", {}).get("embedding", "one-hot")
    return (FAMILIES.index(record["family"]) if record["family"] in FAMILIES else len(FAMILIES),
            PAPER_METHOD_ORDER.index(method) if method in PAPER_METHOD_ORDER else len(PAPER_METHOD_ORDER),
            method,
            EMBEDDING_ORDER.index(embedding) if embedding in EMBEDDING_ORDER else len(EMBEDDING_ORDER),
            record["row_label"])


def table1_frame(records: List[Dict[str, Any]], train_columns: bool = False) -> pd.DataFrame:
    """Rows ``Method (embedding)`` grouped by family, a column per dataset, cells ``mean ± s.e.``."""
    ok = sorted((r for r in records if r.get("status") == "ok"), key=_row_sort_key)
    datasets = list(dict.fromkeys(r["dataset_label"] for r in ok))
    rows, seen_rows = [], {}
    for record in ok:
        key = (record["family"], record["row_label"])
        if key not in seen_rows:
            seen_rows[key] = {"family": record["family"], "Method": record["row_label"], "cells": {}}
            rows.append(seen_rows[key])
        cells = seen_rows[key]["cells"]
        columns = [("test", "test_acc_runs")] + ([("train", "train_acc_runs")] if train_columns else [])
        for split, field in columns:
            cells.setdefault((record["dataset_label"], split), []).extend(record.get(field) or [])
    column_names = []
    for dataset in datasets:
        if train_columns:
            column_names.append((dataset, "train"))
        column_names.append((dataset, "test"))
    table = []
    for family in list(FAMILIES) + sorted({r["family"] for r in rows} - set(FAMILIES)):
        family_rows = [r for r in rows if r["family"] == family]
        if not family_rows:
            continue
        table.append({"Method": f"**{FAMILY_HEADINGS.get(family, family)}**",
                      **{f"{d} {s}": "" for d, s in column_names}})
        for row in family_rows:
            table.append({"Method": row["Method"],
                          **{f"{d} {s}": format_cell(row["cells"].get((d, s), [])) for d, s in column_names}})
    return pd.DataFrame(table, columns=["Method"] + [f"{d} {s}" for d, s in column_names])


def _caption(records: List[Dict[str, Any]]) -> str:
    ok = [r for r in records if r.get("status") == "ok"]
    seeds = sorted({r["seed"] for r in ok})
    runs = sorted({r.get("inference_runs", 1) for r in ok})
    first = ok[0]
    runs_text = " or ".join(str(r) for r in runs)
    return (f"Test accuracy (%): mean ± standard error over {len(seeds)} seed(s) × {runs_text} inference run(s) "
            f"(deterministic methods: one run per seed). Budget {first['budget']} of training per trial; "
            f"backbone {first['backbone']}; batch size {first['batch_size']}; "
            f"device {first.get('environment', {}).get('device_name', '?')}.")


def render_table1(records: List[Dict[str, Any]], train_columns: bool = False) -> str:
    """Markdown Table 1; trials that differ in budget, backbone, device or batch size get separate tables."""
    ok = [r for r in records if r.get("status") == "ok"]
    groups: Dict[Tuple, List[Dict[str, Any]]] = {}
    for record in ok:
        groups.setdefault(_comparability(record), []).append(record)
    parts = ["# Table 1: classification accuracy", ""]
    for group in groups.values():
        has_train = train_columns and any(r.get("train_acc_runs") for r in group)
        frame = table1_frame(group, train_columns=has_train)
        parts += [frame.to_markdown(index=False, colalign=["left"] + ["right"] * (frame.shape[1] - 1)), "",
                  _caption(group), ""]
    if not groups:
        parts += ["No trial finished successfully.", ""]
    not_ok = [r for r in records if r.get("status") != "ok"]
    if not_ok:
        parts.append("Not in the table:")
        for record in not_ok:
            parts.append(f"- {record.get('row_label', record.get('method'))} seed {record.get('seed')} on "
                         f"{record.get('dataset_label', record.get('dataset'))}: {record.get('status')}"
                         f" ({record.get('error')})")
        parts.append("")
    return "\n".join(parts)
