"""A rendered report as structure (title, tables with captions, lists), written as markdown or handed to the
HTML template, so both formats show the same tables."""

from typing import List, NamedTuple, Optional, Sequence, Tuple

import pandas as pd

from .records import markdown


class Section(NamedTuple):
    """One table: an optional sub-heading, the frame of formatted cells and its caption."""
    heading: Optional[str]
    frame: pd.DataFrame
    caption: str


class Document(NamedTuple):
    """A report: its title, its tables, the line shown when there is no table, and titled lists (e.g.
    trials not in the table, records skipped) shown after the tables when not empty."""
    title: str
    sections: List[Section]
    empty: str = ""
    lists: Sequence[Tuple[str, List[str]]] = ()


def to_markdown(document: Document) -> str:
    """The document as markdown: ``# title``, each table with its ``## heading`` and caption, the lists."""
    parts = [f"# {document.title}", ""]
    for section in document.sections:
        if section.heading:
            parts += [f"## {section.heading}", ""]
        parts += [markdown(section.frame), "", section.caption, ""]
    if not document.sections and document.empty:
        parts += [document.empty, ""]
    for heading, items in document.lists:
        if items:
            parts += [heading] + [f"- {item}" for item in items] + [""]
    return "\n".join(parts)
