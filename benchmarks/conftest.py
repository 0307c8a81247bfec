"""Shared benchmark setup: collect ``bench_*.py`` modules, and tell smoke runs from measuring runs.

Benchmarks run at smoke size (seconds, only proving the code runs) unless ``NOPROP_BENCH_FULL=1``
selects the measuring sizes, as ``tox -e bench`` does.
"""

import os

import pytest

FULL = os.environ.get("NOPROP_BENCH_FULL", "") not in ("", "0")


def pytest_collect_file(file_path, parent):
    # files named on the command line are collected by pytest itself; collecting them here too would double them
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)


@pytest.fixture
def smoke() -> bool:
    """True unless ``NOPROP_BENCH_FULL=1``: benchmarks should then shrink to a few seconds."""
    return not FULL
