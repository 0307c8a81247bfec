"""Table 1 in the paper's format: rows ``Method (embedding)`` grouped by family, one column per dataset."""

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pandas as pd

from ..run.jobs import trial_label
from . import paper as paper_data
from .code_versions import OLDER_CODE_MARK, CodeByMethod, older_code_note, older_code_trials
from .document import Document, Section, to_markdown
from .records import (assign_rows, budget_group, check_records, comparable_groups, dataset_columns,
                      drop_duplicate_seeds, family_heading, final_settings_text, format_mean_se, group_distinctions,
                      mean_and_standard_error, ordered_rows, rows_without_duplicate_seeds, settings_text,
                      speed_setting_warnings)

SPLITS = {"train": "train_acc_runs", "test": "test_acc_runs"}


def shows_seed_se(values: Sequence[float], seed_means: Sequence[float]) -> bool:
    """Whether a cell's s.e. over per-seed means differs from its pooled one: two or more seeds and more than
    one inference run per seed."""
    return len(seed_means) > 1 and len(values) > len(seed_means)


def format_cell(values: List[float], seed_means: Sequence[float] = ()) -> str:
    """``mean ± pooled s.e.``, then ``[± s.e. over per-seed means]`` where :func:`shows_seed_se`; see
    :func:`table1_caption`."""
    text = format_mean_se(values)
    if shows_seed_se(values, seed_means):
        text += f" [± {mean_and_standard_error(seed_means)[1]:.2f}]"
    return text


def seeds_per_cell(ok: List[Dict[str, Any]], rows: Sequence[str]) -> Tuple[Dict[Tuple[str, str, str], int], int]:
    """Seeds with values in each ``(row, dataset, split)`` cell of a comparable group of ``ok`` records with
    their assigned ``rows`` (duplicate seeds dropped), and the seeds of the whole group (what the caption
    counts). A seed that did not measure train accuracy is missing from its train cell only."""
    cells: Dict[Tuple[str, str, str], set] = {}
    for record, row in zip(ok, rows):
        for split, field in SPLITS.items():
            if record.get(field):
                cells.setdefault((row, record["dataset"], split), set()).add(record["seed"])
    return {cell: len(seeds) for cell, seeds in cells.items()}, len({r["seed"] for r in ok})


def under_paper_protocol(record: Dict[str, Any]) -> bool:
    """Whether a trial ran under ``--preset paper`` with nothing overridden: only then is a difference to the
    paper's number a measurement of the method rather than of our shorter or different setting."""
    preset = record.get("preset")
    return isinstance(preset, dict) and preset.get("name") == "paper" and not trial_overrides(preset)


def trial_overrides(preset: Dict[str, Any]) -> List[str]:
    """What a trial changed of the preset. ``--seeds``, which records made before it stopped counting kept,
    is left out: it sets how many trials run, not how one trains (the cells say how many seeds they hold)."""
    return [o for o in preset.get("overrides") or [] if not str(o).startswith("--seeds ")]


def delta_rows(ok: Sequence[Dict[str, Any]], rows: Sequence[str]) -> set:
    """The rows that get a difference to the paper: every trial under the paper's protocol, and on each of
    the row's datasets at least the paper's number of seeds (its spread over seeds is part of the number)."""
    seeds: Dict[Tuple[str, str], set] = {}
    for record, row in zip(ok, rows):
        seeds.setdefault((row, record["dataset"]), set()).add(record["seed"])
    return {row for row in rows
            if all(under_paper_protocol(r) for r, name in zip(ok, rows) if name == row)
            and all(len(found) >= paper_data.PAPER_SEEDS for (name, _), found in seeds.items() if name == row)}


def preset_text(records: List[Dict[str, Any]]) -> str:
    """What the caption says of ``--preset paper``: which trials used it and what they overrode."""
    presets = [r.get("preset") for r in records if isinstance(r.get("preset"), dict)]
    if not presets:
        return ""
    overrides = list(dict.fromkeys(o for preset in presets for o in trial_overrides(preset)))
    some = "" if len(presets) == len(records) else f" ({len(presets)} of {len(records)} trials)"
    if not overrides:
        return f" Run with --preset paper{some}, nothing overridden."
    return f" Run with --preset paper{some}, overridden: {', '.join(overrides)}."


def _signed(value: float) -> str:
    return f"{value:+.2f}"


def table1_frame(records: List[Dict[str, Any]], train_columns: bool = False, paper: bool = False,
                 notes: Optional[List[str]] = None, current_code: Optional[CodeByMethod] = None) -> pd.DataFrame:
    """One comparable group of ``ok`` records as a frame of formatted cells (family heading rows included).

    With ``paper``, each of our columns whose dataset the paper has is followed by the paper's number and
    the difference (ours − paper) of the means. Duplicate seeds of a cell are dropped, noted in ``notes``.
    Rows with trials that ran other code than ``current_code`` (see :func:`older_code_trials`) are marked.
    """
    group = [r for r in records if r.get("status") == "ok"]
    rows = assign_rows(group)
    ok, rows, duplicate_notes = drop_duplicate_seeds(group, rows)
    if notes is not None:
        notes.extend(duplicate_notes)
    columns = dataset_columns(ok)
    cells: Dict[Tuple[str, str, str], List[float]] = {}
    seed_means: Dict[Tuple[str, str, str], List[float]] = {}
    for record, row in zip(ok, rows):
        for split, field in SPLITS.items():
            values = record.get(field) or []
            cells.setdefault((row, record["dataset"], split), []).extend(values)
            if values:
                seed_means.setdefault((row, record["dataset"], split), []).append(sum(values) / len(values))
    splits = ["train", "test"] if train_columns else ["test"]
    protocol_rows = delta_rows(ok, rows)
    headers: List[Tuple[str, str, str, str]] = []  # (header, kind, dataset, split)
    for spec, label in columns.items():
        for split in splits:
            headers.append((f"{label} {split}", "ours", spec, split))
            if paper and paper_data.paper_dataset(spec):
                headers.append((f"{label} {split} (paper)", "paper", spec, split))
                if protocol_rows:
                    headers.append((f"{label} {split} Δ", "delta", spec, split))
    cell_seeds, group_seeds = seeds_per_cell(ok, rows)
    older = older_code_trials(ok, current_code, among=group)  # a dropped duplicate may hold the newest code
    marked = {row for record, row in zip(ok, rows) if str(record.get("trial_id")) in older}
    table = []
    current_family = None
    for family, row in ordered_rows(ok, rows):
        if family != current_family:
            table.append([family_heading(family)] + [""] * len(headers))
            current_family = family
        paper_row = paper_data.paper_row_label(next(r for r, name in zip(ok, rows) if name == row))
        line = [f"{row} {OLDER_CODE_MARK}" if row in marked else row]
        for _, kind, spec, split in headers:
            values = cells.get((row, spec, split), [])
            published = (paper_data.paper_accuracy(paper_row, spec, split)
                         if kind != "ours" and paper_row else None)
            if kind == "ours":
                text = format_cell(values, seed_means.get((row, spec, split), []))
                seeds = cell_seeds.get((row, spec, split), 0)
                line.append(f"{text} ({seeds} of {group_seeds} seeds)" if values and seeds < group_seeds else text)
            elif published is None:
                line.append("–")
            elif kind == "paper":
                line.append(f"{published[0]:.2f} ± {published[1]:.2f}")
            elif row not in protocol_rows:
                line.append("–")
            else:
                line.append(_signed(mean_and_standard_error(values)[0] - published[0]) if values else "–")
        table.append(line)
    return pd.DataFrame(table, columns=["Method"] + [h[0] for h in headers])


def _runs_text(records: List[Dict[str, Any]], rows: Sequence[str]) -> str:
    """``2 seed(s) × 1 or 5 inference run(s) per seed (1: Backprop; 5: NoProp-CT)``: by method, or by the
    table's row where one method's rows ran different numbers."""
    seeds = {r["seed"] for r in records}
    names = [str(r.get("method_label") or r["method"]) for r in records]
    counts: Dict[str, set] = {}
    for record, name in zip(records, names):
        counts.setdefault(name, set()).add(int(record.get("inference_runs") or 1))
    by_runs: Dict[int, List[str]] = {}
    for record, name, row in zip(records, names, rows):
        label = row if len(counts[name]) > 1 else name
        methods = by_runs.setdefault(int(record.get("inference_runs") or 1), [])
        if label not in methods:
            methods.append(label)
    counts = " or ".join(str(n) for n in sorted(by_runs))
    breakdown = "; ".join(f"{n}: {', '.join(methods)}" for n, methods in sorted(by_runs.items()))
    return f"{len(seeds)} seed(s) × {counts} inference run(s) per seed ({breakdown})"


SEED_SE_TEXT = (" [± s.e.] is the standard error over the per-seed means (n = seeds): inference runs of one "
                "trained model are not independent, so the pooled ± understates the spread between training runs; "
                "it is shown where the two differ (more than one seed and inference run).")


def _has_seed_se(records: List[Dict[str, Any]], rows: Sequence[str]) -> bool:
    """Whether some cell shows the seed-level s.e. (two or more seeds with more than one inference run)."""
    seeds: Dict[Tuple[str, str], set] = {}
    for record, row in zip(records, rows):
        if len(record.get("test_acc_runs") or []) > 1:
            seeds.setdefault((row, record["dataset"]), set()).add(record["seed"])
    return any(len(found) > 1 for found in seeds.values())


def _fewer_seeds_text(ok: List[Dict[str, Any]], rows: Sequence[str], train_columns: bool) -> str:
    cell_seeds, group_seeds = seeds_per_cell(ok, rows)
    shown = ("train", "test") if train_columns else ("test",)
    if all(seeds == group_seeds for (_, _, split), seeds in cell_seeds.items() if split in shown):
        return ""
    return (" \"(k of n seeds)\" marks a cell with fewer trained models than the table's seeds (the others did "
            "not finish ok, did not run, or did not measure that split); its ± says less about the spread "
            "between training runs.")


def table1_caption(records: List[Dict[str, Any]], train_columns: bool = False, paper: bool = False,
                   current_code: Optional[CodeByMethod] = None) -> str:
    """What the cells are: the statistic, seeds × inference runs, and the shared settings."""
    ok = [r for r in records if r.get("status") == "ok"]
    kept, rows = rows_without_duplicate_seeds(ok)  # the records and rows the cells are made of
    what = "Train and test accuracy (%)" if train_columns else "Test accuracy (%)"
    seed_se = SEED_SE_TEXT if _has_seed_se(kept, rows) else ""
    if len({r.get("seed") for r in kept}) == 1 and any(len(r.get("test_acc_runs") or []) > 1 for r in kept):
        seed_se = (" With one seed, the ± of a method that samples is over inference runs of one trained model: it "
                   "says nothing of the spread between training runs.")
    caption = (f"{what}: mean ± standard error of the mean over every value of a cell, i.e. "
               f"{_runs_text(kept, rows)}, pooled as the paper pools its 3 seeds × 5 inference runs; \"(n=1)\" marks a "
               f"single value.{seed_se}{_fewer_seeds_text(kept, rows, train_columns)} "
               f"{settings_text(kept)}{older_code_note(kept, current_code, among=ok)}")
    final = final_settings_text(kept)
    caption += f" Inference (solver and steps): {final}." if final else ""
    caption += preset_text(ok)
    lacking = ", ".join(dict.fromkeys(r.get("dataset_label") or r["dataset"] for r in kept
                                      if not paper_data.paper_dataset(r["dataset"])))
    if paper and not any(paper_data.paper_dataset(r["dataset"]) for r in kept):
        caption += f" No paper columns: the paper's Table 1 has no column for {lacking}."
    elif paper:
        caption += f" Paper columns: Li, Teh, Pascanu (2025), {paper_data.PAPER_STATISTIC}, for reference"
        caption += f" (none for {lacking}: not in the paper's Table 1)." if lacking else "."
        with_delta = delta_rows(kept, rows)
        if with_delta:
            caption += (f" Δ = our mean − the paper's mean, shown only for rows run under --preset paper with "
                        f"nothing overridden (the paper's protocol) and at least its {paper_data.PAPER_SEEDS} seeds.")
        if len(with_delta) < len(set(rows)):
            caption += (f" No Δ for rows run otherwise (without --preset paper, overriding it, or with fewer than "
                        f"the paper's {paper_data.PAPER_SEEDS} seeds): a difference would not measure the method.")
        subsets = sorted({r["dataset"] for r in ok if r["dataset"] in paper_data.SUBSET_DATASETS})
        for spec in subsets:
            sizes = next((r.get("train_size"), r.get("test_size")) for r in ok if r["dataset"] == spec)
            size_text = f" ({sizes[0]} train / {sizes[1]} test images)" if all(sizes) else ""
            caption += (f" Our {spec} is {paper_data.SUBSET_DATASETS[spec]}{size_text}, so its comparison with "
                        f"the paper's MNIST is indicative only.")
    return caption


def not_ok_lines(records: Sequence[Dict[str, Any]]) -> List[str]:
    """A line per trial that did not finish ``ok`` (failed, diverged, interrupted). A record the host wrote
    for a trial that never reported (its worker died, or it was interrupted) has no dataset label of its
    own: another record's label for the same dataset is used."""
    labels = dataset_columns([r for r in records if r.get("dataset_label")] or records)
    tabled_budgets = {budget_group(r) for r in records if r.get("status") == "ok"}
    lines = []
    for record in records:
        if record.get("status") != "ok":
            dataset = labels.get(record.get("dataset")) or record.get("dataset")
            # a budget no table has: said, so the line is not read as a trial of the tables above
            other = tabled_budgets and budget_group(record) not in tabled_budgets
            budget = f" with budget {record.get('budget')}" if other else ""
            lines.append(f"{trial_label(record)} seed {record.get('seed')} on "
                         f"{dataset}{budget}: {record.get('status')} ({record.get('error')})")
    return lines


def _warning_texts(value: Any) -> List[str]:
    """A record's warnings as texts, whatever a plugin stored: a list, one text, or something else."""
    if not value:
        return []
    if isinstance(value, (list, tuple)):
        return [str(item) for item in value]
    return [str(value)]


def trial_warnings(record: Dict[str, Any]) -> List[str]:
    """Every warning a trial recorded: the harness's (such as checkpoints that fell within one step), the
    method's own ``trial_metrics()["warnings"]`` (such as NoProp-DT blocks a short budget left untrained), and
    speed settings that did not apply in full."""
    metrics = record.get("method_metrics")
    return (_warning_texts(record.get("warnings")) + (
        _warning_texts(metrics.get("warnings")) if isinstance(metrics, dict) else []) + speed_setting_warnings(record))


def warning_lines(records: Sequence[Dict[str, Any]], texts: Callable[[Dict[str, Any]], List[str]] = trial_warnings,
                  by_device: Optional[bool] = None) -> List[str]:
    """A line per warning (``texts`` of a record) of each trial whose values a table holds (of a seed given
    twice in a row and dataset, the last): its cell holds a number all the same, so the table says what
    qualifies it. With several tables (split as ``by_device`` says), each line names its table's settings."""
    groups = comparable_groups([r for r in records if r.get("status") == "ok"], by_device)
    labels = dataset_columns(records)  # as the columns name them: two folders of one name told apart
    lines = []
    for group, distinction in zip(groups, group_distinctions(groups, by_device)):
        where = f" ({distinction})" if distinction else ""
        for record in rows_without_duplicate_seeds(group)[0]:
            dataset = labels.get(record.get("dataset")) or record.get("dataset")
            lines += [f"{trial_label(record)} seed {record.get('seed')} on {dataset}{where}: {warning}"
                      for warning in texts(record)]
    return lines


def table1_document(records: List[Dict[str, Any]], train_columns: bool = False, paper: bool = False,
                    notes: Sequence[str] = (), current_code: Optional[CodeByMethod] = None,
                    not_run: Sequence[str] = ()) -> Document:
    """Table 1 as structure; trials that differ in budget, backbone or batch size get separate tables, and so
    do devices when the budget is in seconds (a sample or step budget is the same training on any device).

    Train columns appear (with ``train_columns``) only in tables whose trials measured train accuracy.
    ``notes`` (what the loader skipped) are listed under the tables, and ``not_run`` (a line per planned trial
    that never began) with the trials that did not finish ok. ``current_code`` (method name → code identity)
    is the code of the run writing the tables: trials that ran other code are marked.
    """
    records, bad = check_records(records)
    notes = list(notes) + bad
    ok = [r for r in records if r.get("status") == "ok"]
    sections = []
    for group in comparable_groups(ok):
        has_train = train_columns and any(r.get("train_acc_runs") for r in group)
        frame = table1_frame(group, train_columns=has_train, paper=paper, notes=notes, current_code=current_code)
        sections.append(Section(None, frame, table1_caption(group, has_train, paper, current_code)))
    return Document("Table 1: classification accuracy", sections, "No trial finished successfully.",
                    [("Warnings of trials in the table:", warning_lines(records)),
                     ("Not in the table:", not_ok_lines(records) + list(not_run)), ("Notes on the records read:", notes)])


def render_table1(records: List[Dict[str, Any]], train_columns: bool = False, paper: bool = False,
                  notes: Sequence[str] = (), current_code: Optional[CodeByMethod] = None,
                  not_run: Sequence[str] = ()) -> str:
    """Markdown Table 1 (see :func:`table1_document`)."""
    return to_markdown(table1_document(records, train_columns, paper, notes, current_code, not_run))
