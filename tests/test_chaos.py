"""The results store under SIGKILL: a small grid killed at 20 random moments (some of them in the middle
of appending a record) and rerun after each kill ends with every trial exactly once, nothing finished
trained twice unless its line was torn, the same accuracies as an uninterrupted run, and tables that render.

Each run is a process forked from a helper that has already imported the harness, so a kill costs the
time of the trials it interrupts, not of importing torch again.
"""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from noprop_bench.report.cli import write_run_outputs
from noprop_bench.run.store import SLOW_APPEND_VARIABLE, TrialStore, latest_per_trial

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the runs are forked from a helper process")

TESTS = Path(__file__).resolve().parent
KILLS = 20
APPEND_PAUSE = 0.05  # seconds in the middle of every appended line: kills land there often
GRID = ["--plugin", "fake_plugins", "--dataset", "tiny", "--methods", "linear,noisy", "--seeds", "6",
        "--budget", "64samples", "--batch-size", "32", "--checkpoints", "1", "--inference-runs", "2",
        "--threads", "1"]

FORKER = r'''
import json, os, sys, traceback
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot  # noqa: F401  (imported once here, not in every run)
import noprop_bench.report.figures  # noqa: F401
from noprop_bench.cli import run
from noprop_bench.plugins import load_plugins
from noprop_bench.provenance import code_identity
import fake_plugins

# what every run would otherwise import or look up again: the plugins (and their imports), the code identity
[code_identity(cls) for cls in load_plugins(["fake_plugins"]).methods.values()]

argv = json.loads(sys.argv[1])
print("ready", flush=True)
for line in sys.stdin:
    out, log = json.loads(line)
    pid = os.fork()
    if pid == 0:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        try:
            code = run([*argv, "--out", out])
        except BaseException:
            traceback.print_exc()
            code = 99
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(pid, flush=True)
    sys.stdin.readline()  # reaped only when the test says so: until then its pid cannot be reused
    print(os.waitpid(pid, 0)[1], flush=True)
'''


class Forker:
    """A helper process that forks one grid run per request; the test kills the runs."""

    def __init__(self, tmp_path):
        env = {**os.environ, SLOW_APPEND_VARIABLE: str(APPEND_PAUSE),
               "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
        self.process = subprocess.Popen([sys.executable, "-c", FORKER, json.dumps(GRID)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
        assert self.process.stdout.readline().strip() == "ready"
        self.logs = tmp_path / "logs"
        self.logs.mkdir()
        self.runs = 0

    def start(self, out: Path) -> int:
        self.runs += 1
        self.process.stdin.write(json.dumps([str(out), str(self.logs / f"run{self.runs}.log")]) + "\n")
        self.process.stdin.flush()
        return int(self.process.stdout.readline())

    def wait(self) -> int:
        """The raw wait status of the run last started."""
        self.process.stdin.write("reap\n")
        self.process.stdin.flush()
        return int(self.process.stdout.readline())

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=30)


def _torn_at(path: Path, appended: int) -> bool:
    """The file holds ``appended`` whole lines and then part of the next one."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return False
    return bool(data) and not data.endswith(b"\n") and data.count(b"\n") == appended


def test_sigkill_at_random_moments_loses_nothing_and_trains_nothing_twice(tmp_path):
    rng = random.Random(15)
    forker = Forker(tmp_path)
    try:
        reference = tmp_path / "reference"
        started = time.perf_counter()
        forker.start(reference)
        assert forker.wait() == 0
        full_run = time.perf_counter() - started
        print(f"uninterrupted run: {full_run:.2f}s")
        expected = {r["trial_id"]: r for r in TrialStore(reference).read()[0]}
        assert len(expected) == 12

        out = tmp_path / "chaos"
        trials = out / "trials.jsonl"
        killed = mid_append = 0
        window = full_run
        for kill in range(KILLS):
            before = trials.read_bytes() if trials.exists() else b""
            lines_before = before.count(b"\n") + (bool(before) and not before.endswith(b"\n"))  # a torn end is ended
            unfinished = set(expected) - TrialStore(out).finished_ids()
            pid = forker.start(out)
            if (kill < 3 or kill % 4 == 0) and unfinished:  # in the middle of one of its next appends
                k = rng.randint(1, min(3, len(unfinished)))
                deadline = time.perf_counter() + 10 * full_run
                while not _torn_at(trials, lines_before + k - 1) and time.perf_counter() < deadline:
                    time.sleep(0.002)
            else:  # at a moment drawn uniformly over the length of the last run that ended by itself
                moment = time.perf_counter() + rng.uniform(0.0, window)
                begun = time.perf_counter()
                while time.perf_counter() < moment and _running(pid):
                    time.sleep(0.002)
                if not _running(pid):
                    window = time.perf_counter() - begun
            os.kill(pid, signal.SIGKILL)  # our own child, not yet reaped: a run that has ended is a zombie
            status = forker.wait()
            if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
                killed += 1
                after = trials.read_bytes() if trials.exists() else b""
                mid_append += len(after) > len(before) and not after.endswith(b"\n")  # this run tore a line
            else:
                assert os.WEXITSTATUS(status) == 0, (forker.logs / f"run{forker.runs}.log").read_text()
        forker.start(out)
        assert forker.wait() == 0, (forker.logs / f"run{forker.runs}.log").read_text()
    finally:
        forker.close()

    records, unreadable = TrialStore(out).read()
    print(f"{killed} of {KILLS} kills hit a running grid, {mid_append} in the middle of an append; "
          f"{len(unreadable)} torn line(s)")
    assert killed >= KILLS // 2 and mid_append >= 1, (killed, mid_append)
    assert len(unreadable) >= mid_append  # every torn line is skipped, and named
    # a trial's "finished" line is printed after its record is appended whole: none may appear twice
    delivered = Counter(re.sub(r"^finished \d+/\d+: ", "", line).split(":")[0]
                        for run in range(2, forker.runs + 1)
                        for line in (forker.logs / f"run{run}.log").read_text().splitlines()
                        if re.match(r"finished \d+/\d+: ", line))
    assert delivered and set(delivered.values()) == {1}, delivered
    finished = Counter(r["trial_id"] for r in records if r["status"] in ("ok", "diverged"))
    assert set(finished) == set(expected)  # every trial present
    assert set(finished.values()) == {1}  # none finished twice: only torn lines were trained again
    effective = latest_per_trial(records)
    assert sorted(r["trial_id"] for r in effective) == sorted(expected)
    for record in effective:  # the same results as the uninterrupted run
        assert record["test_acc_runs"] == expected[record["trial_id"]]["test_acc_runs"]
    table = write_run_outputs(out)
    assert "Linear (one-hot)" in table and "Noisy (one-hot)" in table
    assert table.count("not valid JSON (truncated write?)") == len(unreadable)


def _running(pid: int) -> bool:
    """The child has not ended yet (a zombie has); without /proc, assume it runs."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return not Path("/proc/self").exists()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
