"""Writing every report of a run, and ``noprop-bench report DIR [DIR ...]`` re-rendering them from trials.jsonl."""

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from ..errors import UsageError
from ..help_format import non_empty
from .exports import FORMATS, parse_formats, require_parquet, write_frames, write_html, write_json, write_text
from ..run.store import TRIALS_FILE, TrialStore, check_output_directory
from .code_versions import CodeByMethod
from .table1 import render_table1
from .records import check_records, load_records, not_run_lines
from .tables import render_inference_sweep, render_table2
from .time_to_accuracy import parse_targets, render_time_to_accuracy

EXIT_OK, EXIT_USAGE = 0, 2


def _warn(message: str) -> None:
    print(f"noprop-bench report: warning: {message}", file=sys.stderr)


def write_run_outputs(out_dir, records: Optional[List[Dict[str, Any]]] = None,
                      targets: Union[None, str, Sequence[float]] = None, *, train_columns: Optional[bool] = None,
                      paper: bool = False, notes: Sequence[str] = (),
                      current_code: Optional[CodeByMethod] = None, not_run: Sequence[str] = ()) -> str:
    """Write table1.md, table2.md, time_to_accuracy.md, curves.csv, figure3.png/.svg (and inference_sweep.md
    when a trial has a sweep) into ``out_dir``; return the Table 1 markdown.

    ``records`` default to ``out_dir/trials.jsonl`` (the record that stands for each trial). ``targets`` are
    accuracies in percent (``"90,95,97"`` or numbers); None uses each dataset's defaults. ``train_columns``
    None shows train accuracy wherever it was measured. ``notes`` (what a loader skipped) are listed under Table 1.
    ``current_code`` (method name → code identity), given by a run, marks the trials it kept that ran other code.
    ``not_run`` lines (planned trials that never began) are listed with the trials not in the table.
    """
    from .figures import write_curves_csv, write_figure3

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    notes = list(notes)
    if records is None:
        records, loaded_notes = load_records([out])
        notes += loaded_notes
    records, bad = check_records(records)
    notes += bad
    if isinstance(targets, str):
        targets = parse_targets(targets)
    if train_columns is None:
        train_columns = any(r.get("train_acc_runs") for r in records)
    table1 = render_table1(records, train_columns=train_columns, paper=paper, notes=notes, current_code=current_code,
                           not_run=not_run)
    write_text(out / "table1.md", table1)
    write_text(out / "table2.md", render_table2(records, paper=paper, current_code=current_code))
    write_text(out / "time_to_accuracy.md", render_time_to_accuracy(records, targets))
    write_curves_csv(records, out / "curves.csv")
    if any(r.get("status") == "ok" and r.get("inference_sweep") for r in records):
        write_text(out / "inference_sweep.md", render_inference_sweep(records))
    elif (out / "inference_sweep.md").exists():  # an earlier report's sweep, of trials these tables do not hold
        (out / "inference_sweep.md").unlink()
    try:
        drawn = write_figure3(records, out / "figure3")
    except Exception as error:  # a plotting problem must not cost a finished run its tables
        drawn = []
        _warn(f"figure3 not written: {type(error).__name__}: {error}")
    for suffix in (".png", ".svg"):  # an older figure would show trials these tables no longer hold
        stale = out / f"figure3{suffix}"
        if stale not in drawn and stale.exists():
            stale.unlink()
    return table1


def run_output_names(out_dir) -> str:
    """The report files :func:`write_run_outputs` left in ``out_dir`` (figure3 only when it was drawn)."""
    names = [TRIALS_FILE, "table1.md", "table2.md", "time_to_accuracy.md", "inference_sweep.md", "curves.csv",
             "figure3.png", "figure3.svg"]
    return ", ".join(name for name in names if (Path(out_dir) / name).exists())


def build_report_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="noprop-bench report",
        description="Re-render every table, the curves and Figure 3 from the trials.jsonl of one or more run "
                    "directories (nothing is rerun), as markdown, CSV, Parquet, HTML or JSON. Runs on several "
                    "datasets merge into one Table 1 with a column per dataset; trials with a different budget, "
                    "backbone, device, batch size or speed settings go to separate tables.")
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="run directories, each holding a trials.jsonl")
    parser.add_argument("--out", type=non_empty, default=None,
                        help="where to write the reports (default: DIR itself when one DIR is given, "
                             "else ./report)")
    parser.add_argument("--paper", action="store_true",
                        help="put the paper's Table 1 number next to ours, and the difference for rows run "
                             "under --preset paper with nothing overridden (the paper's protocol)")
    parser.add_argument("--targets", default=None,
                        help="time-to-accuracy targets in percent, e.g. 90,95,97 (default: the --targets of "
                             "the run that wrote the DIRs, when they agree; else per dataset)")
    parser.add_argument("--train-accuracy", action="store_true",
                        help="insist on train-accuracy columns: a warning when no trial measured it (run with "
                             "--train-accuracy); without this flag they appear wherever trials measured it, as "
                             "in the run's own tables")
    parser.add_argument("--format", action="append", metavar="FORMATS",
                        help=f"what to write, comma-separated (or the flag repeated), from {','.join(FORMATS)} "
                             "(default md): md the "
                             "markdown tables, curves.csv and figure3.png/.svg; csv or parquet the frames of "
                             "load_trials, load_runs and load_curves as trials, runs and curve_points files "
                             "(parquet needs the 'parquet' extra); html one self-contained report.html; json "
                             "Table 1 and Table 2 as numbers in report.json")
    return parser


def planned_targets(directories: Sequence[str]) -> Optional[Tuple[float, ...]]:
    """The ``--targets`` the last runs into ``directories`` gave, when they all gave the same (in any order or
    spelling); else None (the defaults per dataset). A plan's value that does not parse counts as none."""
    given: List[Optional[Tuple[float, ...]]] = []
    for directory in directories:
        text = (TrialStore(directory).read_plan() or {}).get("targets")
        try:
            given.append(parse_targets(text) if isinstance(text, str) else None)
        except UsageError:
            given.append(None)
    agree = given[0] is not None and all(t is not None and sorted(t) == sorted(given[0]) for t in given)
    return given[0] if agree else None  # in the order the (first) run gave them, as its columns were


def report_main(argv: Optional[Sequence[str]] = None) -> int:
    """``noprop-bench report DIR [DIR ...] [--out OUT] [--paper] [--targets 90,95,97] [--train-accuracy]
    [--format md,csv,parquet,html,json]``.

    Writes the formats asked for (printing Table 1 with ``md``), warns on stderr about skipped directories
    and lines, and returns 0; returns 2 with one line on stderr when nothing valid was found, a DIR does not
    exist, a ``trials.jsonl`` is a directory, an option is bad or pyarrow is missing for ``parquet``.
    """
    args = build_report_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        targets = parse_targets(args.targets) if args.targets is not None else planned_targets(args.dirs)
        formats = parse_formats(",".join(args.format or ["md"]))
        if "parquet" in formats:
            require_parquet()
        for directory in args.dirs:
            if not Path(directory).exists():  # a typo would quietly leave a run out of a merged report
                raise UsageError(f"{directory}: no such directory")
            if Path(directory).is_file():
                raise UsageError(f"{directory}: a file; give the run directory that holds {TRIALS_FILE}"
                                 + (f" ({Path(directory).parent})" if Path(directory).name == TRIALS_FILE else ""))
        out = Path(args.out) if args.out else (Path(args.dirs[0]) if len(args.dirs) == 1 else Path("report"))
        check_output_directory(out, "--out")
        records, notes = load_records(args.dirs)
    except UsageError as error:
        print(f"noprop-bench report: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if not records:
        reasons = "; ".join(note[:-len("; skipped")] if note.endswith("; skipped") else note for note in notes)
        planned = not_run_lines(args.dirs, [])
        told = (f"; the last command planned {len(planned)} trial(s) there, and none left a record (the run "
                f"ended before the first finished, or was killed)" if planned else "")
        print(f"noprop-bench report: error: nothing to report ({reasons or 'no trials'}){told}; each DIR must hold "
              f"a trials.jsonl written by noprop-bench", file=sys.stderr)
        return EXIT_USAGE
    for note in notes:
        _warn(note)
    measured_train = any(r.get("train_acc_runs") for r in records)
    if args.train_accuracy and not measured_train:
        _warn("--train-accuracy: no trial measured train accuracy (rerun with --train-accuracy); test only")
    written = []
    not_run = not_run_lines(args.dirs, records)
    if "md" in formats:
        table1 = write_run_outputs(out, records, targets, train_columns=measured_train, paper=args.paper,
                                   notes=notes, not_run=not_run)
        print(table1)
        written.append(run_output_names(out).replace(f"{TRIALS_FILE}, ", ""))
    out.mkdir(parents=True, exist_ok=True)
    for kind in ("csv", "parquet"):
        if kind in formats:
            written.append(", ".join(path.name for path in write_frames(records, out, kind)))
    if "json" in formats:
        written.append(write_json(records, out, notes, paper=args.paper, not_run=not_run).name)
    if "html" in formats:
        written.append(write_html(records, out, notes=notes, targets=targets, paper=args.paper,
                                  train_columns=measured_train, sources=[str(d) for d in args.dirs],
                                  not_run=not_run).name)
    print(f"reports in {out}/ ({'; '.join(written)})", file=sys.stderr)
    return EXIT_OK
