import pytest
import torch

import fake_plugins


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
