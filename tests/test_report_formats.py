"""``noprop-bench report --format``: CSV, Parquet, JSON and the self-contained HTML page."""

import json
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from noprop_bench.report import frames
from noprop_bench.report.cli import report_main
from noprop_bench.report.exports import parse_formats
from noprop_bench.report.records import load_records
from noprop_bench.report.table1 import render_table1, table1_document
from noprop_bench.report.tables import inference_sweep_document, render_table2, table2_document
from noprop_bench.report.time_to_accuracy import time_to_accuracy_document
from noprop_bench.errors import UsageError

TESTS = Path(__file__).parent
DIRS = ["fixtures/report/mnist", "fixtures/report/cifar10"]


@pytest.fixture(autouse=True)
def _relative_paths(monkeypatch):
    monkeypatch.chdir(TESTS)


def report(tmp_path, formats, *extra):
    out = tmp_path / "out"
    return report_main([*DIRS, "--out", str(out), "--format", formats, *extra]), out


def test_parse_formats():
    assert parse_formats("md, HTML,md") == ["md", "html"]
    for bad in ("", "pdf", "md,xlsx"):
        with pytest.raises(UsageError, match="md, csv, parquet, html, json"):
            parse_formats(bad)


def test_bad_format_is_exit_2(tmp_path, capsys):
    code, out = report(tmp_path, "md,pdf")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "'md,pdf'" in err[0]
    assert not out.exists()


def test_md_is_the_default_and_unchanged(tmp_path, capsys):
    default = tmp_path / "default"
    assert report_main([*DIRS, "--out", str(default)]) == 0
    printed = capsys.readouterr().out
    code, out = report(tmp_path, "md")
    assert code == 0 and capsys.readouterr().out == printed
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in default.iterdir())
    assert "table1.md" in names and not any(n.startswith(("report.", "trials.")) for n in names)
    for name in ("table1.md", "table2.md", "time_to_accuracy.md", "inference_sweep.md", "curves.csv"):
        assert (out / name).read_text() == (default / name).read_text(), name


def test_csv_writes_the_three_frames_and_no_markdown(tmp_path, capsys):
    code, out = report(tmp_path, "csv")
    assert code == 0 and capsys.readouterr().out == ""  # Table 1 is printed with md only
    assert sorted(p.name for p in out.iterdir()) == ["curve_points.csv", "runs.csv", "trials.csv"]
    records = load_records(DIRS)[0]
    for stem, make in (("trials", frames.trials_frame), ("runs", frames.runs_frame),
                       ("curve_points", frames.curves_frame)):
        written = pd.read_csv(out / f"{stem}.csv")
        expected = make(records)
        assert list(written.columns) == list(expected.columns) and len(written) == len(expected), stem
    trials = pd.read_csv(out / "trials.csv")
    assert trials["test_acc_mean"].notna().sum() == (trials["status"] == "ok").sum()


def test_parquet_keeps_the_dtypes(tmp_path):
    pytest.importorskip("pyarrow")
    code, out = report(tmp_path, "parquet")
    assert code == 0
    records = load_records(DIRS)[0]
    for stem, make in (("trials", frames.trials_frame), ("runs", frames.runs_frame),
                       ("curve_points", frames.curves_frame)):
        written = pd.read_parquet(out / f"{stem}.parquet")
        expected = make(records)
        assert dict(written.dtypes.astype(str)) == dict(expected.dtypes.astype(str)), stem
        pd.testing.assert_frame_equal(written, expected)


def test_parquet_without_pyarrow_is_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    code, out = report(tmp_path, "md,parquet")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "noprop-bench[parquet]" in err[0]
    assert not out.exists()  # refused before writing anything


def test_json_summary_matches_the_markdown_tables(tmp_path):
    code, out = report(tmp_path, "json")
    assert code == 0
    summary = json.loads((out / "report.json").read_text())
    records, notes = load_records(DIRS)
    table1, table2 = render_table1(records, train_columns=True, notes=notes), render_table2(records)
    assert len(summary["table1"]) == len(table1_document(records).sections)
    cells = [c for t in summary["table1"] for c in t["cells"]]
    assert {c["split"] for c in cells} == {"train", "test"}
    for cell in cells:
        text = f"{cell['mean']:.2f} (n=1)" if cell["n"] == 1 else f"{cell['mean']:.2f} ± {cell['se']:.2f}"
        if cell["n"] > cell["seeds"] > 1:  # Table 1 then adds the s.e. over per-seed means
            text += f" [± {cell['se_over_seed_means']:.2f}]"
        line = next(l for l in table1.splitlines() if l.startswith(f"| {cell['row']} "))
        assert text in line, (cell["row"], cell["dataset"], cell["split"])
        assert cell["n"] == len(cell["values"]) and cell["seeds"] <= cell["n"]
    ct = next(c for c in cells if c["row"] == "NoProp-CT (one-hot)" and c["split"] == "test"
              and c["dataset"] == "mnist5k")
    assert ct["seeds"] == 2 and ct["n"] == 6  # 2 seeds x 3 inference runs
    for table in summary["table1"]:  # a table's seeds are the n of "(k of n seeds)"
        for cell in table["cells"]:
            line = next(l for l in table1.splitlines() if l.startswith(f"| {cell['row']} "))
            fewer = re.search(r"\((\d+) of (\d+) seeds\)", line)
            assert (int(fewer.group(2)) if fewer else cell["seeds"]) == table["seeds"]
    seed_means = [sum(ct["values"][:3]) / 3, sum(ct["values"][3:]) / 3]
    assert ct["se_over_seed_means"] == pytest.approx(abs(seed_means[0] - seed_means[1]) / 2)
    assert len(summary["table2"]) == len(table2_document(records).sections)
    for cell in (c for t in summary["table2"] for c in t["cells"]):
        line = next(l for l in table2.splitlines() if l.startswith(f"| {cell['row']} "))
        assert f"{cell['samples_per_second']:.0f}" in line
    assert summary["not_ok"] and any("diverged" in line for line in summary["not_ok"])
    captions = [line for line in table1.splitlines() if line.startswith("Train and test accuracy (%)")]
    assert [t["caption"] for t in summary["table1"]] == captions  # the conditions travel with the numbers
    assert "paper" not in cells[0]


def test_json_summary_with_paper_holds_the_papers_numbers(tmp_path):
    code, out = report(tmp_path, "json", "--paper")
    assert code == 0
    cells = [c for t in json.loads((out / "report.json").read_text())["table1"] for c in t["cells"]]
    dt = next(c for c in cells if c["row"] == "NoProp-DT (one-hot)" and c["dataset"] == "cifar10")
    assert dt["paper"] == {"row": "NoProp-DT (one-hot)", "mean": 79.25, "se": 0.28, "delta": None}  # no protocol
    assert next(c for c in cells if c["row"] == "Backprop with linear head")["paper"] is None  # not in the paper
    assert all("paper" in c and "older_code" in c for c in cells)


class Page(HTMLParser):
    """Collects tags with their attributes, section ids, inline styles and text."""

    def __init__(self):
        super().__init__()
        self.tags, self.text, self.styles, self.in_style = [], [], [], False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self.in_style = tag == "style"

    def handle_endtag(self, tag):
        self.in_style = False

    def handle_data(self, data):
        (self.styles if self.in_style else self.text).append(data)

    def count(self, tag, **attrs):
        return sum(1 for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in attrs.items()))


def test_html_holds_every_table_and_the_figure(tmp_path):
    code, out = report(tmp_path, "html", "--train-accuracy")
    assert code == 0 and [p.name for p in out.iterdir()] == ["report.html"]
    source = (out / "report.html").read_text(encoding="utf-8")
    page = Page()
    page.feed(source)
    records, _ = load_records([f"{d}" for d in DIRS])
    documents = {"table1": table1_document(records, train_columns=True), "table2": table2_document(records),
                 "time-to-accuracy": time_to_accuracy_document(records),
                 "inference-sweep": inference_sweep_document(records)}
    ids = [a.get("id") for t, a in page.tags if t == "section"]
    assert ids == ["table1", "table2", "time-to-accuracy", "inference-sweep", "figure3", "provenance"]
    tables = sum(len(d.sections) for d in documents.values())
    assert page.count("table") == tables + 1  # and the machines table
    text = " ".join(page.text)
    for document in documents.values():
        for section in document.sections:
            assert section.caption in text
            for row in section.frame["Method"]:
                assert row.strip("*") in text
    assert "NoProp-CT (prototype) seed 1 on MNIST5k: diverged" in text
    assert page.count("svg") == 1 and "<svg" in source.split('id="figure3"')[1]
    assert "noprop-bench ..." in text and "cpu (x86_64, 2 logical cores, 2 threads)" in text  # command, machine
    assert page.count("meta", name="viewport") == 1
    css = " ".join(page.styles)
    assert "@media print" in css and "overflow-x: auto" in css


def test_html_refers_to_nothing_outside_itself(tmp_path):
    code, out = report(tmp_path, "html")
    source = (out / "report.html").read_text(encoding="utf-8")
    page = Page()
    page.feed(source)
    assert not [t for t, _ in page.tags if t in ("script", "link", "img", "iframe", "object", "embed")]
    for tag, attrs in page.tags:
        for name in ("src", "href", "xlink:href", "srcset", "action"):
            if name in attrs:
                assert attrs[name].startswith("#"), (tag, name, attrs[name])
    assert "@import" not in source and "@font-face" not in source
    assert all(ref.startswith("#") for ref in re.findall(r"url\(\s*['\"]?([^'\")]*)", source))
    assert not re.search(r"https?://", source)


def test_html_survives_a_plotting_error(tmp_path, monkeypatch):
    import noprop_bench.report.html as html_module

    def broken(records):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(html_module, "figure3_svg", broken)
    code, out = report(tmp_path, "html")
    source = (out / "report.html").read_text(encoding="utf-8")
    assert code == 0 and "Figure 3 could not be drawn (RuntimeError: no fonts)" in source
    assert 'id="table1"' in source and "<svg" not in source


def test_html_escapes_what_records_hold(tmp_path):
    record = json.loads((TESTS / "fixtures/report/cifar10/trials.jsonl").read_text().splitlines()[0])
    record["command"] = "noprop-bench --methods '<script>alert(1)</script>'"
    (tmp_path / "trials.jsonl").write_text(json.dumps(record) + "\n")
    assert report_main([str(tmp_path), "--format", "html"]) == 0
    source = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "<script>" not in source and "&lt;script&gt;" in source
    assert 'id="inference-sweep"' not in source  # no sweep in this run: no empty section
