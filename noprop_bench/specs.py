"""Parsing the command line's method and dataset specifications."""

import re
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from .errors import UsageError
from .method import row_label_with_settings

_METHOD = re.compile(r"^([A-Za-z_][\w\-]*)(?:\[(.*)\])?$")


def split_top_level(text: str) -> List[str]:
    """Split on commas that are not inside square brackets."""
    parts, depth, current = [], 0, []
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise UsageError(f"unbalanced ']' in {text!r}")
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth:
        raise UsageError(f"unbalanced '[' in {text!r}")
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def parse_method_spec(text: str, what: str = "method") -> Tuple[str, Dict[str, str]]:
    """``"noprop_ct[embedding=prototype,lr=3e-4]"`` -> ``("noprop_ct", {"embedding": ..., "lr": ...})``.

    ``what`` names the kind of thing in error messages (executors are written the same way).
    """
    match = _METHOD.match(text.strip())
    if not match:
        raise UsageError(f"{what} {text!r} not understood; write NAME or NAME[key=value,...]")
    name, body = match.group(1), match.group(2)
    params: Dict[str, str] = {}
    for item in split_top_level(body or ""):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise UsageError(f"{what} parameter {item!r} in {text!r} not understood; write key=value")
        if key.strip() in params:
            raise UsageError(f"{what} parameter {key.strip()!r} is given twice in {text!r}; give it once")
        params[key.strip()] = value.strip()
    return name, params


def parse_method_list(text: str) -> List[Tuple[str, Dict[str, str]]]:
    specs = [parse_method_spec(part) for part in split_top_level(text)]
    if not specs:
        raise UsageError("--methods is empty; give at least one method, e.g. --methods backprop")
    return specs


def parse_dataset_spec(text: str) -> Tuple[str, Optional[str]]:
    """``"imagefolder:/data/x"`` -> ``("imagefolder", "/data/x")``; ``"mnist"`` -> ``("mnist", None)``."""
    name, sep, argument = text.strip().partition(":")
    if not name:
        raise UsageError(f"dataset {text!r} not understood; write NAME or NAME:ARGUMENT")
    if "[" in name:  # written like a method's options
        raise UsageError(f"dataset {text!r} not understood; a dataset takes its argument after a colon "
                         f"(NAME:ARGUMENT, e.g. imagefolder:/data/pets), not in brackets")
    return name, (argument if sep else None)


def distinct_methods(resolved: Iterable[Tuple[str, type, Dict[str, Any]]], say: Callable[[str], None]
                     ) -> List[Tuple[type, Dict[str, Any]]]:
    """``(class, params)`` of each ``(name, class, params)`` once, in order: a method named again with the same
    parameters would only repeat a row, so it is dropped with a note."""
    methods: List[Tuple[type, Dict[str, Any]]] = []
    for name, cls, params in resolved:
        if (cls, params) not in methods:
            methods.append((cls, params))
        else:
            say(f"note: --methods names {row_label_with_settings(cls, params)} ({name}) more than once with the same "
                f"parameters; it runs once")
    return methods
