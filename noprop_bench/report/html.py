"""``report.html``: every table, Figure 3 and the commands and machines of a run in one self-contained page,
rendered with Jinja2 from ``templates/report.html.j2``."""

from collections import Counter
from typing import Any, Dict, List, Optional, Sequence

import jinja2

from .document import Document
from .figures import figure3_svg
from .records import checkpoint_text
from .records import check_records, device_name
from .table1 import table1_document
from .tables import inference_sweep_document, table2_document
from .time_to_accuracy import time_to_accuracy_document

TEMPLATE = "report.html.j2"
MACHINE_FIELDS = ("device_name", "host", "platform", "python", "torch", "torchvision", "timm")


def _environment():
    return jinja2.Environment(loader=jinja2.PackageLoader("noprop_bench.report", "templates"),
                              autoescape=True, trim_blocks=True, lstrip_blocks=True,
                              undefined=jinja2.StrictUndefined)


def _table(frame) -> Dict[str, Any]:
    """A frame of formatted cells as header and rows; a row whose first cell is ``**Family**`` and the rest
    empty is a family heading spanning the table."""
    rows = []
    for line in frame.astype(str).values.tolist():
        first = line[0]
        if first.startswith("**") and first.endswith("**") and not any(line[1:]):
            rows.append({"heading": first.strip("*"), "cells": []})
        else:
            rows.append({"heading": None, "cells": line})
    return {"header": [str(c) for c in frame.columns], "rows": rows}


def _part(document: Document, anchor: str) -> Dict[str, Any]:
    return {"title": document.title, "anchor": anchor, "empty": document.empty,
            "sections": [{"heading": s.heading, "table": _table(s.frame), "caption": s.caption}
                         for s in document.sections],
            "lists": [(heading, items) for heading, items in document.lists if items]}


def _machine(record: Dict[str, Any]) -> tuple:
    environment = record.get("environment") if isinstance(record.get("environment"), dict) else {}
    return (device_name(record),) + tuple(str(environment.get(field, "–")) for field in MACHINE_FIELDS[1:])


def provenance(records: Sequence[Dict[str, Any]]) -> Dict[str, List[Dict[str, Any]]]:
    """The distinct commands (with how many trials each ran) and machines of the records."""
    commands = Counter(str(record.get("command") or "unknown command") for record in records)
    machines = Counter(_machine(record) for record in records)
    return {"commands": [{"command": c, "trials": n} for c, n in commands.items()],
            "machine_fields": list(MACHINE_FIELDS),
            "machines": [{"values": list(k), "trials": n} for k, n in machines.items()]}


def render_html(records: List[Dict[str, Any]], *, notes: Sequence[str] = (),
                targets: Optional[Sequence[float]] = None, paper: bool = False, train_columns: bool = False,
                sources: Sequence[str] = (), not_run: Sequence[str] = ()) -> str:
    """The whole page as text: Table 1, Table 2, time to accuracy, the inference sweep (when a trial has
    one), Figure 3 as inline SVG, and the commands and machines behind the trials. ``not_run`` as for
    ``table1_document``."""
    records, bad = check_records(records)
    parts = [_part(table1_document(records, train_columns, paper, list(notes) + bad, not_run=not_run), "table1"),
             _part(table2_document(records, paper), "table2"),
             _part(time_to_accuracy_document(records, targets), "time-to-accuracy")]
    if any(r.get("status") == "ok" and r.get("inference_sweep") for r in records):
        parts.append(_part(inference_sweep_document(records), "inference-sweep"))
    try:
        figure, figure_error = figure3_svg(records), None
    except Exception as error:  # a plotting problem must not cost the page its tables
        figure, figure_error = None, f"{type(error).__name__}: {error}"
    statuses = Counter(str(record.get("status")) for record in records)
    points = checkpoint_text([r for r in records if r.get("status") == "ok"]) if figure else ""
    return _environment().get_template(TEMPLATE).render(
        parts=parts, figure=figure, figure_error=figure_error, figure_points=points, provenance=provenance(records),
        sources=list(sources), statuses=statuses)
