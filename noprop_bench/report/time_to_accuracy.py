"""Time to accuracy (DAWNBench style): the first training time at which a trial's test accuracy reached a target."""

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from ..errors import UsageError
from .document import Document, Section, to_markdown
from .records import (assign_rows, check_records, checkpoint_text, comparable_groups, dataset_columns,
                      drop_duplicate_seeds, group_distinctions, ordered_rows, settings_text)

DEFAULT_TARGETS = {
    "mnist": (90.0, 95.0, 97.0), "mnist5k": (90.0, 95.0, 97.0), "fashion_mnist": (80.0, 85.0, 90.0),
    "cifar10": (60.0, 70.0, 80.0), "cifar100": (30.0, 40.0, 50.0),
}
FALLBACK_TARGETS = (50.0, 70.0, 90.0)


def default_targets(dataset_spec: str) -> Tuple[float, ...]:
    return DEFAULT_TARGETS.get(str(dataset_spec).split(":")[0], FALLBACK_TARGETS)


def parse_targets(text: str) -> Tuple[float, ...]:
    """``"90,95,97"`` -> ``(90.0, 95.0, 97.0)``; a clear :class:`UsageError` otherwise."""
    try:
        targets = tuple(float(part) for part in str(text).split(",") if part.strip())
    except ValueError:
        raise UsageError(f"--targets {text!r}: expected accuracies in percent separated by commas, e.g. 90,95,97") from None
    if not targets or not all(0 < t <= 100 for t in targets):
        raise UsageError(f"--targets {text!r}: expected accuracies between 0 and 100, e.g. 90,95,97")
    return tuple(dict.fromkeys(targets))  # a target given twice is one column


def first_time_reaching(curve: Any, target: float) -> Optional[float]:
    """Training seconds at the first curve point with ``test_acc >= target``; None if never reached."""
    points = []
    for point in curve if isinstance(curve, list) else []:
        if not isinstance(point, dict):
            continue
        seconds, accuracy = point.get("train_seconds"), point.get("test_acc")
        if isinstance(seconds, (int, float)) and isinstance(accuracy, (int, float)):
            points.append((float(seconds), float(accuracy)))
    for seconds, accuracy in sorted(points):
        if accuracy >= target:
            return seconds
    return None


def _final_accuracy(record: Dict[str, Any]) -> float:
    """The trial's reported test accuracy at the end of its budget (NaN when it has none)."""
    value = record.get("test_acc")
    return float(value) if isinstance(value, (int, float)) else float("nan")


def format_seconds(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 1000:
        return f"{seconds:.1f} s"
    return f"{seconds:.0f} s"


def time_to_accuracy_frame(records: List[Dict[str, Any]], targets: Sequence[float]) -> pd.DataFrame:
    """One dataset of one comparable group: a row per method, a column per target.

    A cell is the mean over the seeds that reached the target, with ``(k/n seeds)`` when not all of the
    table's n seeds did (a seed whose trial did not finish ok counts as not reaching it) and ``m ended below``
    when m of them finished their budget below it (a passing peak of a noisy curve).
    """
    rows = assign_rows(records)
    records, rows, _ = drop_duplicate_seeds(records, rows)
    seeds = len({r["seed"] for r in records})
    table = []
    for _, row in ordered_rows(records, rows):
        trials = [r for r, name in zip(records, rows) if name == row]
        line = [row]
        for target in targets:
            times = [first_time_reaching(r.get("curve"), target) for r in trials]
            reached = [t for t in times if t is not None]
            if not reached:
                line.append("not reached")
                continue
            text = format_seconds(float(np.mean(reached)))
            notes = [f"{len(reached)}/{seeds} seeds"] if len(reached) < seeds else []
            below = sum(1 for r, t in zip(trials, times) if t is not None and _final_accuracy(r) < target)
            if below:
                notes.append(f"{below} ended below")
            line.append(f"{text} ({', '.join(notes)})" if notes else text)
        table.append(line)
    return pd.DataFrame(table, columns=["Method"] + [f"≥ {t:g}%" for t in targets])


def resolution_text(records: List[Dict[str, Any]]) -> str:
    """A warning for the caption when the trials ran with different ``--checkpoints`` (a run resumed with
    another value reuses its finished trials): a method evaluated less often is seen to reach a target
    later. Records from before the setting was stored are not judged."""
    counts = sorted({r["checkpoints"] for r in records if isinstance(r.get("checkpoints"), int)})
    if len(counts) < 2:
        return ""
    return (f"The trials here ran with different --checkpoints ({', '.join(map(str, counts))}), so their times "
            f"have different resolution and do not compare directly. ")


def time_to_accuracy_document(records: List[Dict[str, Any]], targets: Optional[Sequence[float]] = None) -> Document:
    """Per comparable group (one device each) and dataset, the time each method first reached each target."""
    records, _ = check_records(records)
    ok = [r for r in records if r.get("status") == "ok"]
    sections = []
    groups = comparable_groups(ok, by_device=True)
    for group, distinction in zip(groups, group_distinctions(groups, by_device=True)):
        for spec, label in dataset_columns(group).items():
            chosen = tuple(targets) if targets else default_targets(spec)
            trials = [r for r in group if r["dataset"] == spec]
            frame = time_to_accuracy_frame(trials, chosen)
            sections.append(Section(f"{label} ({distinction})" if distinction else label, frame, (
                "Training seconds (evaluation excluded) until the first test evaluation at or above each "
                "target, mean over the seeds that reached it; \"(k/n seeds)\" when only k of the table's n "
                "did (a trial that did not finish ok did not), \"not reached\" when no seed did within "
                "its budget. One evaluation at or above the target counts, even if later ones fall below "
                "it: \"m ended below\" says how many of the seeds that reached it finished their budget "
                "below it (Table 1 has the final accuracies). Resolution is the spacing of the test "
                "evaluations (--checkpoints), and the curve is observed only, never used to stop training. "
                + " ".join(part for part in (resolution_text(trials).strip(), checkpoint_text(group),
                                             settings_text(group)) if part))))
    return Document("Time to accuracy", sections, "No trial finished successfully.")


def render_time_to_accuracy(records: List[Dict[str, Any]], targets: Optional[Sequence[float]] = None) -> str:
    """Markdown time to accuracy (see :func:`time_to_accuracy_document`)."""
    return to_markdown(time_to_accuracy_document(records, targets))
