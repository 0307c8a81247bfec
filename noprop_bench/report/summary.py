"""Table 1 and Table 2 as numbers (``report.json``): the same groups, rows and cells as the markdown tables,
with means and standard errors instead of formatted text."""

from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .records import (budget_unit, check_records, comparability, comparable_groups, dataset_columns, device_counts,
                      field_mean, is_finite_number, mean_and_standard_error, memory_kind, ordered_rows,
                      rows_without_duplicate_seeds, seconds_per_epoch)
from . import paper as paper_data
from .code_versions import older_code_trials
from .table1 import SPLITS, delta_rows, not_ok_lines, table1_caption, warning_lines
from .tables import GB, by_memory_kind, table1_groups_of

SUMMARY_FORMAT = "noprop-bench report summary"
SUMMARY_VERSION = 1


def _number(value: Any) -> Optional[float]:
    """JSON has no NaN: a missing or non-finite number is null."""
    return float(value) if is_finite_number(value) else None


def _settings(record: Dict[str, Any], by_device: Optional[bool]) -> Dict[str, Any]:
    budget, backbone, device, _, speed = comparability(record, by_device)
    return {"budget": budget, "budget_unit": budget_unit(record), "backbone": backbone, "device": device,
            "batch_size": record.get("batch_size"), "speed": speed}


def _cells(group: List[Dict[str, Any]], rows: List[str]):
    """``(family, row, dataset spec, dataset label, records of the cell)`` in the tables' order, from
    :func:`~.records.rows_without_duplicate_seeds`."""
    for family, row in ordered_rows(group, rows):
        for spec, label in dataset_columns(group).items():
            chosen = [r for r, name in zip(group, rows) if name == row and r["dataset"] == spec]
            if chosen:
                yield family, row, spec, label, chosen


def accuracy_cell(records: Sequence[Dict[str, Any]], field: str) -> Optional[Dict[str, Any]]:
    """Mean and s.e. over every value of a cell (seeds × inference runs, as Table 1 shows), and the s.e. over
    the per-seed means; None when no trial of the cell measured ``field``."""
    per_seed = [[v for v in r.get(field) or [] if _number(v) is not None] for r in records]
    values = [v for seed in per_seed for v in seed]
    if not values:
        return None
    mean, se, n = mean_and_standard_error(values)
    seed_means = [float(np.mean(seed)) for seed in per_seed if seed]
    return {"mean": _number(mean), "se": _number(se), "n": n, "seeds": len(seed_means),
            "se_over_seed_means": _number(mean_and_standard_error(seed_means)[1]), "values": values}


def _paper_cell(record: Dict[str, Any], spec: str, split: str, ours: Optional[float],
                with_delta: bool) -> Optional[Dict[str, Any]]:
    """The paper's Table 1 number for a cell, or None where the paper has none; ``delta`` (our mean − the
    paper's) only for a row run under the paper's protocol (the Δ of ``table1.md``), null otherwise."""
    row = paper_data.paper_row_label(record)
    published = paper_data.paper_accuracy(row, spec, split) if row else None
    if published is None:
        return None
    delta = _number(ours - published[0]) if with_delta and ours is not None else None
    return {"row": row, "mean": _number(published[0]), "se": _number(published[1]), "delta": delta}


def table1_summary(records: List[Dict[str, Any]], paper: bool = False) -> List[Dict[str, Any]]:
    """One entry per Table 1 table (comparable group) with one cell per row, dataset and split, and the
    caption of ``table1.md`` (what the cells are and the conditions they were measured under); ``older_code``
    where a trial of the cell ran other code than its method's newest (``†`` in ``table1.md``); with
    ``paper``, each cell's published number and, for rows run under the paper's protocol, the difference
    (``paper``, null where the paper has none)."""
    tables = []
    for group in comparable_groups(records):
        cells = []
        kept, rows = rows_without_duplicate_seeds(group)
        older, protocol_rows = older_code_trials(kept, among=group), delta_rows(kept, rows)  # table1.md's † and Δ
        for family, row, spec, label, chosen in _cells(kept, rows):
            for split, field in SPLITS.items():
                cell = accuracy_cell(chosen, field)
                if cell is not None:
                    cells.append({"family": family, "row": row, "method": chosen[0]["method"], "dataset": spec,
                                  "dataset_label": label, "split": split, **cell,
                                  "older_code": any(str(r.get("trial_id")) in older for r in chosen),
                                  **({"paper": _paper_cell(chosen[0], spec, split, cell["mean"],
                                                           row in protocol_rows)} if paper else {})})
        train_columns = any(cell["split"] == "train" for cell in cells)
        settings = _settings(group[0], None)
        devices = device_counts(group)
        if settings["device"] is None and len(devices) == 1:  # a table not split by device still ran on one
            settings["device"] = next(iter(devices))
        tables.append({**settings, "devices": dict(sorted(devices.items())), "seeds": len({r["seed"] for r in kept}),
                       "caption": table1_caption(group, train_columns, paper), "cells": cells})
    return tables


def table2_summary(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One entry per Table 2 table (comparable group on one device, one memory kind), a cell per row and
    dataset: means over seeds, and ``older_code`` where a trial of the cell ran older code (``†`` in
    ``table2.md``, judged as in Table 1)."""
    tables = []
    table1_trials = table1_groups_of(records)
    for group in comparable_groups(records, by_device=True):
        older = older_code_trials(group, among=table1_trials[comparability(group[0])])  # the † of table2.md
        for kind_records in by_memory_kind(group):
            kind = memory_kind(kind_records[0])
            kept, rows = rows_without_duplicate_seeds(kind_records)
            cells = [{"family": family, "row": row, "method": chosen[0]["method"], "dataset": spec,
                      "dataset_label": label, "seeds": len(chosen),
                      "older_code": any(str(r.get("trial_id")) in older for r in chosen),
                      "peak_memory_gb": _number(field_mean(chosen, "peak_memory_bytes", GB)),
                      "samples_per_second": _number(field_mean(chosen, "samples_per_second")),
                      "seconds_per_epoch": _number(seconds_per_epoch(chosen))}
                     for family, row, spec, label, chosen in _cells(kept, rows)]
            tables.append({**_settings(group[0], True), "memory_kind": kind, "seeds": len({r["seed"] for r in kept}),
                           "cells": cells})
    return tables


def summary(records: List[Dict[str, Any]], notes: Sequence[str] = (), paper: bool = False,
            not_run: Sequence[str] = ()) -> Dict[str, Any]:
    """Table 1 and Table 2 of ``records`` as plain data (JSON-ready); accuracies in %, memory in GB (10^9
    bytes), ``se`` null for a single value; the warnings of the trials in the tables, as under Table 1, and in
    ``not_ok`` the trials that did not finish ok, then the planned ones that left no record (``not_run``)."""
    records, bad = check_records(records)
    ok = [r for r in records if r.get("status") == "ok"]
    return {"format": SUMMARY_FORMAT, "version": SUMMARY_VERSION,
            "table1": table1_summary(ok, paper), "table2": table2_summary(ok), "warnings": warning_lines(ok),
            "not_ok": not_ok_lines(records) + list(not_run), "skipped": list(notes) + bad}
