"""Committed runs under results/ show what their own trials give: every table and curves file a run
directory holds is what ``noprop-bench report`` renders from its ``trials.jsonl`` with this code. A
change to how cells are computed or printed then comes with the re-rendered files, or this fails."""

import shutil
from pathlib import Path

import pytest

from noprop_bench.report import figures
from noprop_bench.report.cli import write_run_outputs

RESULTS = Path(__file__).resolve().parent.parent / "results"
RENDERED = ("table1.md", "table2.md", "time_to_accuracy.md", "inference_sweep.md", "curves.csv")
RUNS = sorted(path.parent for path in RESULTS.rglob("trials.jsonl")
              if any((path.parent / name).exists() for name in RENDERED))


def test_the_committed_runs_are_found():
    assert len(RUNS) >= 8 and all(run.is_dir() for run in RUNS)


@pytest.mark.parametrize("run", RUNS, ids=lambda run: str(run.relative_to(RESULTS)))
def test_a_committed_runs_files_are_what_its_trials_render(run, tmp_path, monkeypatch):
    monkeypatch.setattr(figures, "write_figure3", lambda records, stem: [])  # figures: not compared, slow to draw
    shutil.copy(run / "trials.jsonl", tmp_path / "trials.jsonl")
    write_run_outputs(tmp_path)
    committed = [name for name in RENDERED if (run / name).exists()]
    assert "table1.md" in committed
    stale = [name for name in committed if (run / name).read_text() != (tmp_path / name).read_text()]
    assert stale == [], f"re-render with: noprop-bench report {run.relative_to(RESULTS.parent)}"
