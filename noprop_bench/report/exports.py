"""The report formats besides markdown: the three frames as CSV or Parquet, ``report.json`` and ``report.html``."""

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..errors import UsageError
from .frames import curves_frame, runs_frame, trials_frame
from .html import render_html
from .summary import summary

FORMATS = ("md", "csv", "parquet", "html", "json")
# file stem -> the frame written under it (load_trials, load_runs and load_curves of the same records)
FRAME_FILES = {"trials": trials_frame, "runs": runs_frame, "curve_points": curves_frame}
PARQUET_MISSING = ("--format parquet needs pyarrow, which is not installed: pip install 'noprop-bench[parquet]' "
                   "(or pip install pyarrow)")


def parse_formats(text: str) -> List[str]:
    """``"md,html"`` -> ``["md", "html"]``; a :class:`UsageError` naming the accepted formats otherwise."""
    formats = [part.strip().lower() for part in str(text).split(",") if part.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if not formats or unknown:
        raise UsageError(f"--format {text!r}: expected one or more of {', '.join(FORMATS)} separated by commas")
    return list(dict.fromkeys(formats))


def require_parquet() -> None:
    """A :class:`UsageError` saying which extra to install when pyarrow is missing."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise UsageError(PARQUET_MISSING) from None


def write_text(path: Path, text: str) -> Path:
    """Write via a temporary file and rename, so a reader never sees half a file."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
    return path


def write_frames(records: List[Dict[str, Any]], out, kind: str) -> List[Path]:
    """``trials``, ``runs`` and ``curve_points`` as ``.csv`` or ``.parquet`` files in ``out``."""
    if kind == "parquet":
        require_parquet()
    written = []
    for stem, make in FRAME_FILES.items():
        frame = make(records)
        path = Path(out) / f"{stem}.{kind}"
        if kind == "csv":
            frame.to_csv(path, index=False)
        else:
            frame.to_parquet(path, index=False)
        written.append(path)
    return written


def write_json(records: List[Dict[str, Any]], out, notes: Sequence[str] = (), paper: bool = False,
               not_run: Sequence[str] = ()) -> Path:
    """``report.json``: Table 1 and Table 2 as numbers (see :func:`summary.summary`)."""
    text = json.dumps(summary(records, notes, paper, not_run), indent=1, ensure_ascii=False, allow_nan=False)
    return write_text(Path(out) / "report.json", text + "\n")


def write_html(records: List[Dict[str, Any]], out, *, notes: Sequence[str] = (),
               targets: Optional[Sequence[float]] = None, paper: bool = False, train_columns: bool = False,
               sources: Sequence[str] = (), not_run: Sequence[str] = ()) -> Path:
    """``report.html`` (see :func:`html.render_html`)."""
    page = render_html(records, notes=notes, targets=targets, paper=paper, train_columns=train_columns,
                       sources=sources, not_run=not_run)
    return write_text(Path(out) / "report.html", page)
