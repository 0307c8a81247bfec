import os

import pytest
import torch

import fake_plugins

MOST_WORKERS = 4  # `pytest -n auto`: each test may start worker pools or a local cluster of its own


@pytest.hookimpl(optionalhook=True)  # plain pytest without pytest-xdist has no such hook
def pytest_xdist_auto_num_workers(config):
    """``pytest -n auto`` (the README's test command): one worker per core, at most ``MOST_WORKERS``, unless
    ``PYTEST_XDIST_AUTO_NUM_WORKERS`` says how many."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, MOST_WORKERS))


def pytest_configure(config):
    """Under ``pytest -n``, the workers share the cores' torch threads rather than each taking them all."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, torch.get_num_threads() // workers))


@pytest.fixture
def one_thread():
    """Tiny models run on one thread: OpenMP workers spinning on a busy machine distort step times."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fake_run(tmp_path, one_thread):
    """Run the CLI in-process with the fake plugins loaded; returns (exit code, out dir)."""
    from noprop_bench.cli import run

    def go(*args, out=None):
        out = out or tmp_path / "out"
        code = run(["--plugin", "fake_plugins", "--dataset", "tiny", "--out", str(out), *args])
        return code, out

    fake_plugins.FINISHED.clear()
    return go
