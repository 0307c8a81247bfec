"""``noprop-bench new-plugin NAME``: a ready plugin distribution, rendered from the package's templates."""

import argparse
import importlib.util
import keyword
import re
import sys
from importlib.resources import files
from pathlib import Path
from string import Template
from typing import Dict, List, Optional, Sequence, Tuple

from .errors import UsageError
from .help_format import non_empty
from .plugins import load_plugins_saying

KINDS = {
    "method": {"check": "check_method", "usage": "noprop-bench --methods {name},backprop --dataset mnist5k "
                                                  "--budget 2000samples"},
    "dataset": {"check": "check_dataset", "usage": "noprop-bench --methods backprop --dataset {name} "
                                                   "--budget 2000samples"},
    "executor": {"check": "check_executor", "usage": "noprop-bench --methods backprop --seeds 2 --dataset mnist5k "
                                                     "--budget 2000samples --executor '{name}[workers=2]'"},
}
# files beyond the common ones and the kind's __init__.py and test
EXTRA_FILES = {"executor": {"executor/__main__.py.tmpl": "{name}/__main__.py"}}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="noprop-bench new-plugin",
        description="Write a ready plugin distribution: pyproject.toml with the noprop_bench entry point, a "
                    "Method, Dataset or Executor skeleton that already works and whose docstrings explain each "
                    "hook, a test calling the "
                    "conformance check (noprop_bench.testing) and a README. Then: pip install -e PATH; "
                    "pytest PATH; noprop-bench --list.")
    parser.add_argument("name", metavar="NAME",
                        help="the plugin's name: the method, dataset or executor name on the command line and "
                             "its Python package (lower case letters, digits, underscores)")
    parser.add_argument("--dir", type=non_empty, default=None, metavar="PATH",
                        help="where to write the distribution (default: ./noprop-bench-NAME, with NAME's "
                             "underscores as hyphens); must not exist or be empty")
    parser.add_argument("--kind", choices=sorted(KINDS), default="method",
                        help="what the plugin provides (default: method)")
    return parser


def class_name(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_") if part)


def with_article(kind: str) -> str:
    """``a method``, ``a dataset``, ``an executor``."""
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def check_name(name: str, kind: str = "method") -> None:
    if keyword.iskeyword(name):
        raise UsageError(f"plugin name {name!r}: a Python keyword cannot name a package; choose another")
    if not _NAME.match(name):
        raise UsageError(f"plugin name {name!r}: use lower case letters, digits and underscores, starting with a "
                         f"letter (it is a Python package name too)")
    if importlib.util.find_spec(name) is not None:
        raise UsageError(f"plugin name {name!r}: a Python module of that name already exists here; choose another")
    registry = load_plugins_saying(None, lambda message: print(message, file=sys.stderr))
    taken = registry.table(kind)
    if name in taken:
        raise UsageError(f"plugin name {name!r}: plugin {registry.provider[f'{kind}:{name}']!r} already provides "
                         f"{with_article(kind)} of that name; choose another")
    if registry.plugin_manager.has_plugin(name) or name in registry.broken:
        raise UsageError(f"plugin name {name!r}: an installed plugin already has that name (its entry point in "
                         f"the noprop_bench group); choose another")


_TRAILING = re.compile(r"^(?P<code>\s*\S.*?)\s{2,}(?P<comment># .*)$")
_COMMENT_ONLY = re.compile(r"^(?P<indent>\s*)(?P<comment># .*)$")


def _code_and_comment(line: str) -> Optional[Tuple[str, str]]:
    """A line's code (empty for a comment alone) and its comment, or None when it has no comment."""
    alone = _COMMENT_ONLY.match(line)
    if alone:
        return "", alone["comment"]
    trailing = _TRAILING.match(line)
    return (trailing["code"], trailing["comment"]) if trailing else None


def align_comments(template: str, text: str) -> str:
    """``text`` (``template`` with its placeholders replaced) with the comments the template lined up in one
    column lined up again, one column apart from their longest code: a plugin's names, of any length, moved
    them."""
    before, after = template.split("\n"), text.split("\n")
    if len(before) != len(after):
        return text
    columns: Dict[Tuple[int, int], List[int]] = {}  # (stretch of non-blank lines, comment column) -> lines
    stretch = 0
    for index, line in enumerate(before):
        parts = _code_and_comment(line)
        if not line.strip():
            stretch += 1
        elif parts:
            columns.setdefault((stretch, len(line) - len(parts[1])), []).append(index)
    for lines in columns.values():
        parts = [_code_and_comment(after[index]) for index in lines]
        codes = [part[0] for part in parts if part and part[0]]
        if len(lines) < 2 or not codes or None in parts or all(before[i] == after[i] for i in lines):
            continue
        width = max(len(code) for code in codes) + 2
        for index, (code, comment) in zip(lines, parts):
            after[index] = (code or "").ljust(width) + comment
    return "\n".join(after)


def render_plugin(name: str, directory: Path, kind: str = "method") -> List[Path]:
    """Write the distribution for plugin ``name`` into ``directory``; returns the files written."""
    check_name(name, kind)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise UsageError(f"--dir {directory}: exists and is not an empty folder; choose a new one")
    values = {"name": name, "class_name": class_name(name), "package": name, "kind": kind,
              "distribution": f"noprop-bench-{name.replace('_', '-')}", "check": KINDS[kind]["check"],
              "usage": KINDS[kind]["usage"].format(name=name)}
    layout: Dict[str, str] = {"common/pyproject.toml.tmpl": "pyproject.toml", "common/README.md.tmpl": "README.md",
                              f"{kind}/__init__.py.tmpl": f"{name}/__init__.py",
                              f"{kind}/test.py.tmpl": f"tests/test_{name}.py",
                              **{source: target.format(name=name)
                                 for source, target in EXTRA_FILES.get(kind, {}).items()}}
    templates = files(__package__) / "templates"
    written = []
    for source, target in layout.items():
        path = directory / target
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            template = templates.joinpath(source).read_text(encoding="utf-8")
            text = Template(template).substitute(values)
            path.write_text(align_comments(template, text) if target.endswith(".py") else text, encoding="utf-8")
        except OSError as error:
            raise UsageError(f"--dir {directory}: cannot write {target} there ({type(error).__name__}: "
                             f"{error.strerror or error})") from None
        written.append(path)
    return written


def new_plugin_main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    directory = Path(args.dir or f"noprop-bench-{args.name.replace('_', '-')}")
    render_plugin(args.name, directory, args.kind)
    print(f"wrote {with_article(args.kind)} plugin distribution for {args.name!r} in {directory}/. Next:\n"
          f"  pip install -e {directory}\n  pytest {directory}\n  noprop-bench --list\n"
          f"  {KINDS[args.kind]['usage'].format(name=args.name)}")
    return 0
