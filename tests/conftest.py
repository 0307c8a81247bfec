import pytest

import fake_plugins


@pytest.fixture
def fake_run(tmp_path):
    """Run the CLI in-process with the fake plugins loaded; returns (exit code, out dir)."""
    from noprop_bench.cli import run

    def go(*args, out=None):
        out = out or tmp_path / "out"
        code = run(["--plugin", "fake_plugins", "--dataset", "tiny", "--out", str(out), *args])
        return code, out

    fake_plugins.FINISHED.clear()
    return go
