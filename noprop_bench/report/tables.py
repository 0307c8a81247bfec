"""Table 2 (peak memory, throughput, time per epoch) and the inference-settings sweep table."""

from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pandas as pd

from ..run.jobs import trial_label
from . import paper as paper_data
from .code_versions import OLDER_CODE_MARK, CodeByMethod, older_code_note, older_code_trials
from .document import Document, Section, to_markdown
from .records import (assign_rows, check_records, comparability, comparable_groups, dataset_columns,
                      drop_duplicate_seeds, family_heading, field_mean, memory_kind, ordered_rows,
                      rows_without_duplicate_seeds, seconds_per_epoch, setting_label, settings_text,
                      speed_setting_warnings)
from .table1 import SEED_SE_TEXT, format_cell, shows_seed_se, warning_lines

GB = 1e9
MEMORY_KINDS = {
    "cuda_max_allocated": ("CUDA max allocated (torch.cuda.max_memory_allocated over training), the measure "
                           "closest to the paper's \"process GPU memory allocated\". It includes everything on "
                           "the device during training: the dataset (training and test splits are held there), "
                           "the model, its optimiser state and activations"),
    "cuda_max_allocated_and_graph_pools": (
        "CUDA max allocated over training, plus the device memory reserved for the CUDA graphs of the "
        "recorded training updates (--compile on CUDA): the updates' activations and gradients live in those "
        "graphs' pools between replays, where max allocated does not see them. Pools are reserved in whole "
        "allocator segments, so this is a little above what the same steps allocate eagerly; NoProp-DT "
        "holds one graph per block"),
    "cpu_peak_rss": ("peak resident set size of the whole process on the CPU (sampled during training); it "
                     "includes the interpreter, the libraries and the dataset held in memory, so it is not "
                     "comparable with the paper's GPU numbers"),
}


def _number(value: float) -> str:
    if not np.isfinite(value):
        return "–"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def table2_frame(records: List[Dict[str, Any]], paper: bool = False,
                 current_code: Optional[CodeByMethod] = None,
                 among: Optional[List[Dict[str, Any]]] = None) -> pd.DataFrame:
    """Rows as Table 1; per dataset: peak memory (GB), samples/s and s/epoch, each a mean over seeds.

    ``records`` must be one comparable group with one memory kind. With ``paper`` (CUDA memory only), the
    paper's memory for the one-hot rows is shown next to ours. Rows with trials of other code than
    ``current_code`` (see ``code_versions.older_code_trials``) are marked as in Table 1: the newest code is
    that of ``among`` (the trials of Table 1's table, see :func:`table1_groups_of`) where given.
    """
    records, rows = rows_without_duplicate_seeds(records)
    cell_seeds, seeds = _seeds_per_cell(records, rows)
    older = older_code_trials(records, current_code, among)
    marked = {row for record, row in zip(records, rows) if str(record.get("trial_id")) in older}
    columns = dataset_columns(records)
    show_paper = paper and all(memory_kind(r) == "cuda_max_allocated" for r in records)
    headers = []
    for spec, label in columns.items():
        headers += [(f"{label} peak memory (GB)", spec, "memory")]
        if show_paper and paper_data.paper_dataset(spec):
            headers += [(f"{label} paper (GB, one-hot)", spec, "paper")]
        headers += [(f"{label} samples/s", spec, "throughput"), (f"{label} s/epoch", spec, "epoch")]
    table, current_family = [], None
    for family, row in ordered_rows(records, rows):
        if family != current_family:
            table.append([family_heading(family)] + [""] * len(headers))
            current_family = family
        line = [f"{row} {OLDER_CODE_MARK}" if row in marked else row]
        for _, spec, kind in headers:
            cell = [r for r, name in zip(records, rows) if name == row and r["dataset"] == spec]
            held = cell_seeds.get((row, spec), 0)
            fewer = f" ({held} of {seeds} seeds)" if held < seeds else ""
            if not cell:
                line.append("–")
            elif kind == "memory":
                line.append(_number(field_mean(cell, "peak_memory_bytes", GB)) + fewer)
            elif kind == "throughput":
                line.append(_number(field_mean(cell, "samples_per_second")) + fewer)
            elif kind == "epoch":
                line.append(_number(seconds_per_epoch(cell)) + fewer)
            else:
                one_hot = cell[0]["row_label"].endswith("(one-hot)")
                published = paper_data.paper_memory_gb(cell[0]["method"], spec) if one_hot else None
                line.append("–" if published is None else f"{published:.2f}")
        table.append(line)
    return pd.DataFrame(table, columns=["Method"] + [h[0] for h in headers])


# what the CUDA max-allocated figure holds for a method whose memory the paper's table compares
CUDA_MEMORY_OF_METHOD = {
    "noprop_dt": "NoProp-DT keeps all T blocks and their AdamW moments there unless run with offload=true (then "
                 "one block at a time)",
    "backprop_dt": "Backprop (backprop_dt) is the end-to-end model, all blocks' activations kept for one backward "
                   "pass",
}


def _memory_text(kind: str, records: List[Dict[str, Any]]) -> str:
    """What the memory column measures, with a word on the methods of the table that hold it differently."""
    text = MEMORY_KINDS.get(kind, f"measure {kind!r}")
    if kind == "cuda_max_allocated":
        methods = dict.fromkeys(r.get("method") for r in records)
        text += "".join(f". {CUDA_MEMORY_OF_METHOD[m]}" for m in methods if m in CUDA_MEMORY_OF_METHOD)
    return text


def table2_caption(records: List[Dict[str, Any]], paper: bool = False,
                   current_code: Optional[CodeByMethod] = None,
                   among: Optional[List[Dict[str, Any]]] = None) -> str:
    kind = memory_kind(records[0])
    seeds = len({r["seed"] for r in records})
    paper_text = (" Paper column: the paper's memory table (one-hot embedding, its own unnamed GPU and batch "
                  "settings), so the comparison is indicative." if paper and kind == "cuda_max_allocated" else "")
    fewer = (" \"(k of n seeds)\" marks a mean over fewer trials than the table's seeds (the others did not "
             "finish ok or did not run)." if _has_fewer_seeds(records) else "")
    return (f"Peak memory in GB (10^9 bytes): {_memory_text(kind, records)}. Training throughput "
            f"in samples/s = training samples / training seconds (evaluation excluded); s/epoch = train-set "
            f"size / throughput. Means over {seeds} seed(s).{fewer} {settings_text(records)}{paper_text}"
            f"{older_code_note(records, current_code, among)}{speed_warnings_note(records)}")


def speed_warnings_note(records: List[Dict[str, Any]]) -> str:
    """A caption sentence when some trials did not run under their speed settings in full (listed below the
    tables): their throughput is partly eager."""
    if not any(speed_setting_warnings(record) for record in records):
        return ""
    return (" Some trials ran part of their code eagerly despite their speed settings (listed below the "
            "tables): their throughput is not all the settings' own.")


def _seeds_per_cell(records: List[Dict[str, Any]], rows: List[str]) -> Tuple[Dict[Tuple[str, str], int], int]:
    """Seeds per ``(row, dataset)`` of Table 2 (records without duplicate seeds, with their rows), and the
    table's seeds."""
    cells: Dict[Tuple[str, str], set] = {}
    for record, row in zip(records, rows):
        cells.setdefault((row, record["dataset"]), set()).add(record["seed"])
    return {cell: len(found) for cell, found in cells.items()}, len({r["seed"] for r in records})


def _has_fewer_seeds(records: List[Dict[str, Any]]) -> bool:
    """Whether a row and dataset of Table 2 holds fewer seeds than the table (duplicate seeds counted once)."""
    cells, seeds = _seeds_per_cell(*rows_without_duplicate_seeds(records))
    return any(found < seeds for found in cells.values())


def table2_document(records: List[Dict[str, Any]], paper: bool = False,
                    current_code: Optional[CodeByMethod] = None) -> Document:
    """Table 2 as structure: one table per comparable group, device and memory kind (kinds are never mixed),
    with the trials whose speed settings did not apply in full listed below."""
    records, _ = check_records(records)
    ok = [r for r in records if r.get("status") == "ok"]
    table1_trials = table1_groups_of(ok)
    sections = []
    for group in comparable_groups(ok, by_device=True):
        among = table1_trials[comparability(group[0])]
        for kind_records in by_memory_kind(group):
            sections.append(Section(None, table2_frame(kind_records, paper, current_code, among),
                                    table2_caption(kind_records, paper, current_code, among)))
    return Document("Table 2: peak memory and training time", sections, "No trial finished successfully.",
                    [("Speed settings not applied in full:",
                      warning_lines(ok, speed_setting_warnings, by_device=True))])


def table1_groups_of(ok: List[Dict[str, Any]]) -> Dict[Tuple, List[Dict[str, Any]]]:
    """The trials of each Table 1 table (duplicate seeds included: one dropped may hold its method's newest
    code), by comparability: a Table 2 table is part of one, and judges older code against the same trials."""
    return {comparability(group[0]): group for group in comparable_groups(ok)}


def by_memory_kind(group: List[Dict[str, Any]]) -> List[List[Dict[str, Any]]]:
    """A Table 2 group split by how its memory was measured (kinds are never mixed in a table)."""
    kinds: Dict[str, List[Dict[str, Any]]] = {}
    for record in group:
        kinds.setdefault(memory_kind(record), []).append(record)
    return list(kinds.values())


def render_table2(records: List[Dict[str, Any]], paper: bool = False,
                  current_code: Optional[CodeByMethod] = None) -> str:
    """Markdown Table 2 (see :func:`table2_document`)."""
    return to_markdown(table2_document(records, paper, current_code))


# -- inference sweep --------------------------------------------------------------------------------
def _sweep_points(record: Dict[str, Any], notes: List[str]) -> List[Tuple[str, List[float]]]:
    points = []
    for point in record.get("inference_sweep") or []:
        runs = point.get("test_acc_runs") if isinstance(point, dict) else None
        if not isinstance(runs, list) or not all(isinstance(v, (int, float)) for v in runs):
            notes.append(f"{trial_label(record)} seed {record['seed']}: a sweep point without test_acc_runs; skipped")
            continue
        points.append((setting_label(point.get("setting")), runs))
    return points


def inference_sweep_document(records: List[Dict[str, Any]]) -> Document:
    """Per comparable group and dataset, one row per method, one column per inference setting."""
    records, _ = check_records(records)
    swept = [r for r in records if r.get("status") == "ok" and r.get("inference_sweep")]
    sections, notes = [], []
    for group in comparable_groups(swept):
        rows = assign_rows(group)
        group, rows, _ = drop_duplicate_seeds(group, rows)
        for spec, label in dataset_columns(group).items():
            cells: Dict[Tuple[str, str], List[float]] = {}
            seed_means: Dict[Tuple[str, str], List[float]] = {}
            settings: List[str] = []
            chosen = [(r, row) for r, row in zip(group, rows) if r["dataset"] == spec]
            for record, row in chosen:
                for setting, runs in _sweep_points(record, notes):
                    if setting not in settings:
                        settings.append(setting)
                    cells.setdefault((row, setting), []).extend(runs)
                    if runs:
                        seed_means.setdefault((row, setting), []).append(sum(runs) / len(runs))
            order = ordered_rows([r for r, _ in chosen], [row for _, row in chosen])
            frame = pd.DataFrame([[row] + [format_cell(cells.get((row, s), []), seed_means.get((row, s), []))
                                           for s in settings]
                                  for _, row in order], columns=["Method"] + settings)
            seed_se = any(shows_seed_se(cells[key], means) for key, means in seed_means.items())
            sections.append(Section(label, frame, "Test accuracy (%) of the model at the end of its budget, "
                                    "evaluated with each inference setting: mean ± standard error over seeds × "
                                    "inference runs." + (SEED_SE_TEXT if seed_se else "") + " "
                                    + settings_text(group)))
    return Document("Inference settings: test accuracy (%) by solver and steps", sections,
                    "No trial has an inference sweep.", [("Notes on the records read:", list(dict.fromkeys(notes)))])


def render_inference_sweep(records: List[Dict[str, Any]]) -> str:
    """Markdown inference-settings sweep (see :func:`inference_sweep_document`)."""
    return to_markdown(inference_sweep_document(records))
