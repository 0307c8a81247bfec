"""Figure 3: test accuracy against cumulative training time, and the ``curves.csv`` beneath it.

matplotlib is imported inside :func:`figure3` only, so importing this module stays cheap.
"""

import io
import re
import textwrap
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from .records import (assign_rows, check_records, checkpoint_settings_text, comparability, comparable_groups,
                      dataset_columns, drop_duplicate_seeds, has_points_before_the_last, ordered_rows,
                      point_setting)

LEGEND_WIDTH = 45  # characters per legend line: a long row label (a path among its parameters) is wrapped
CURVE_COLUMNS = ["table", "budget", "backbone", "device", "batch_size", "dataset", "dataset_label", "method",
                 "row_label", "seed", "point", "final", "train_seconds", "steps", "samples", "epochs",
                 "test_acc", "train_loss", "test_images", "setting"]


def _ok_groups(records: List[Dict[str, Any]]) -> List[Tuple[List[Dict[str, Any]], List[str]]]:
    records, _ = check_records(records)
    groups = []
    for group in comparable_groups((r for r in records if r.get("status") == "ok"), by_device=True):
        rows = assign_rows(group)
        group, rows, _ = drop_duplicate_seeds(group, rows)
        groups.append((group, rows))
    return groups


def curves_frame(records: List[Dict[str, Any]]) -> pd.DataFrame:
    """Every curve point of every ok trial, one row each; ``table`` numbers the comparable groups (one device
    each) as Table 2 does, ``final`` marks the end-of-budget evaluation (the last point), ``test_images``
    says how many test images the point evaluated (records from before ``--checkpoint-size``: all), ``setting``
    at which inference setting (see :func:`~noprop_bench.report.records.point_setting`)."""
    lines = []
    for number, (group, rows) in enumerate(_ok_groups(records), 1):
        dataset_order = list(dataset_columns(group))
        row_order = [row for _, row in ordered_rows(group, rows)]
        ordered = sorted(zip(group, rows), key=lambda pair: (dataset_order.index(pair[0]["dataset"]),
                                                             row_order.index(pair[1]), str(pair[0]["seed"])))
        for record, row in ordered:
            budget, backbone, device, batch, _ = comparability(record, by_device=True)
            curve = [p for p in record.get("curve") or [] if isinstance(p, dict)]
            for index, point in enumerate(curve):
                lines.append([number, budget, backbone, device, batch, record["dataset"],
                              record.get("dataset_label", record["dataset"]), record["method"], row,
                              record["seed"], index, index == len(curve) - 1,
                              *(point.get(k) for k in ("train_seconds", "steps", "samples", "epochs",
                                                       "test_acc", "train_loss")),
                              point.get("test_images", record.get("test_size")),
                              point_setting(record, index == len(curve) - 1)])
    return pd.DataFrame(lines, columns=CURVE_COLUMNS)


def write_curves_csv(records: List[Dict[str, Any]], path) -> Path:
    path = Path(path)
    curves_frame(records).to_csv(path, index=False, float_format="%.6g")
    return path


def seed_band(curves: Sequence[Sequence[Tuple[float, float]]]) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean and range over seeds of accuracy-vs-time curves sampled at different times.

    Each curve is interpolated linearly onto the union of all sample times from its first point on, and
    holds its final accuracy after its last point (the trained model does not change once its budget is
    spent), so the mean does not jump when one seed ends a little earlier. The mean starts where every seed
    has a point (before that it would be the mean of fewer seeds, and would dip or jump as the others
    join, which no seed did); the band starts at the first point. Returns ``(times, mean, low, high)``.
    """
    curves = [sorted(c) for c in curves if len(c)]
    if not curves:
        empty = np.array([])
        return empty, empty, empty, empty
    times = np.unique(np.concatenate([[t for t, _ in c] for c in curves]))
    values = np.full((len(curves), len(times)), np.nan)
    for i, curve in enumerate(curves):
        t, y = np.array(curve, dtype=float).T
        inside = times >= t[0]
        values[i, inside] = np.interp(times[inside], t, y)
    return times, values.mean(axis=0), np.nanmin(values, axis=0), np.nanmax(values, axis=0)


def _points(record: Dict[str, Any]) -> List[Tuple[float, float]]:
    points = []
    for point in record.get("curve") or []:
        if isinstance(point, dict):
            t, y = point.get("train_seconds"), point.get("test_acc")
            if isinstance(t, (int, float)) and isinstance(y, (int, float)) and np.isfinite([t, y]).all():
                points.append((float(t), float(y)))
    return points


def _band_text(pairs: Sequence[Tuple[Dict[str, Any], str]], short: bool = False) -> str:
    """What the lines and bands of ``(record, row)`` pairs are; where every line has one seed there is no
    band, and each line is that seed's curve."""
    seeds: Dict[Tuple[str, Any], set] = {}
    for record, row in pairs:
        seeds.setdefault((row, record.get("dataset")), set()).add(record.get("seed"))
    if all(len(found) < 2 for found in seeds.values()):
        return "one seed: its curve, no band" if short else "line: the one seed's curve (no band: one seed)"
    if short:
        return "mean, band min–max over seeds"
    return "line: mean over seeds (from where every seed has a point), band: min–max over seeds"


def figure3(records: List[Dict[str, Any]]):
    """Figure 3 as a matplotlib ``Figure``: a row of panels (one per dataset) per comparable group, a line per
    method (mean over seeds) with a band (min to max over seeds); None when no ok trial has a curve."""
    groups = [(g, r) for g, r in _ok_groups(records) if any(_points(x) for x in g)]
    if not groups:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width = max(len(dataset_columns(g)) for g, _ in groups)
    figure = Figure(figsize=(4.5 * width, 3.6 * len(groups)), constrained_layout=True)
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(groups), width, squeeze=False)
    all_rows = list(dict.fromkeys(row for g, r in groups for _, row in ordered_rows(g, r)))
    colours = {row: f"C{i % 10}" for i, row in enumerate(all_rows)}
    for g_index, (group, rows) in enumerate(groups):
        budget, backbone, device, batch, speed = comparability(group[0], by_device=True)
        for d_index, (spec, label) in enumerate(dataset_columns(group).items()):
            ax = axes[g_index][d_index]
            chosen = [(r, row) for r, row in zip(group, rows) if r["dataset"] == spec]
            for _, row in ordered_rows([r for r, _ in chosen], [row for _, row in chosen]):
                times, mean, low, high = seed_band([_points(r) for r, name in chosen if name == row])
                if not len(times):
                    continue
                ax.plot(times, mean, color=colours[row], label=textwrap.fill(row, LEGEND_WIDTH), marker="o",
                        markersize=2.5, linewidth=1.4)
                ax.fill_between(times, low, high, color=colours[row], alpha=0.2, linewidth=0)
            # each line wrapped to the panel's width (10 pt characters are up to about 6.5 pt wide), not cut off
            title = label if len(groups) == 1 else "\n".join(textwrap.fill(line, int(4.5 * 72 / 6.5)) for line in [
                label, f"{budget}, {backbone}, batch {batch}, {speed}", device, _band_text(chosen, short=True),
                *_points_lines([r for r, _ in chosen])])
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("cumulative training time (s)")
            ax.set_ylabel("test accuracy (%)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7, loc="best")  # the place that covers the fewest points
        for d_index in range(len(dataset_columns(group)), width):
            axes[g_index][d_index].set_visible(False)
    if len(groups) == 1:
        budget, backbone, device, batch, speed = comparability(groups[0][0][0], by_device=True)
        ok = [r for g, _ in groups for r in g]
        lines = [f"Budget {budget}, backbone {backbone}, batch {batch}, {speed}", device,
                 _band_text([pair for g, r in groups for pair in zip(g, r)]),
                 *_points_lines(ok)]
        # wrapped to the figure's width (8 pt characters are about 4.4 pt wide), not cut off at its edges
        figure.suptitle("\n".join(textwrap.fill(line, int(4.5 * width * 72 / 4.4)) for line in lines), fontsize=8)
    return figure


def _points_lines(records: List[Dict[str, Any]]) -> List[str]:
    """What the title says of points measured otherwise than the last: a test subset, a cheaper setting."""
    if not has_points_before_the_last(records):
        return []
    subset = sorted({r.get("checkpoint_size") for r in records
                     if r.get("checkpoint_size") and r.get("checkpoint_size") != r.get("test_size")})
    settings = checkpoint_settings_text(records)
    if not subset and not settings:
        return []
    parts = ([f"{' or '.join(map(str, subset))} test images"] if subset else []) + ([settings] if settings else [])
    return [f"points before the last: {'; '.join(parts)} (the last: Table 1's evaluation)"]


def write_figure3(records: List[Dict[str, Any]], stem) -> List[Path]:
    """``stem.png`` and ``stem.svg`` of :func:`figure3`; returns the files written, none when no ok trial has
    a curve."""
    figure = figure3(records)
    if figure is None:
        return []
    stem = Path(stem)
    written = []
    for suffix, metadata in ((".png", {"Software": None}), (".svg", {"Date": None})):
        path = stem.with_suffix(suffix)
        figure.savefig(path, dpi=120, metadata=metadata)
        written.append(path)
    return written


def figure3_svg(records: List[Dict[str, Any]]) -> Optional[str]:
    """:func:`figure3` as an ``<svg>`` element to inline in HTML (no XML prolog, metadata or namespace
    declarations, so it refers to nothing outside itself); None when there is no curve."""
    figure = figure3(records)
    if figure is None:
        return None
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", metadata={"Date": None})
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg, flags=re.S)
    svg = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", svg)
    # drawn at 1.4 times the PNG's size (it has a viewBox, so it scales); CSS shrinks it to narrow screens
    svg = re.sub(r'^<svg width="([\d.]+)pt" height="([\d.]+)pt"',
                 lambda m: f'<svg width="{float(m[1]) * 1.4:.1f}pt" height="{float(m[2]) * 1.4:.1f}pt"', svg)
    return svg
