"""Shared benchmark setup: collect ``bench_*.py`` modules, and tell smoke runs from measuring runs."""

import pytest


def pytest_collect_file(file_path, parent):
    # files named on the command line are collected by pytest itself; collecting them here too would double them
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)


@pytest.fixture
def smoke(request) -> bool:
    """True under ``--benchmark-disable`` (CI's smoke pass): benchmarks should shrink to a few seconds."""
    return bool(request.config.getoption("benchmark_disable", default=False))
