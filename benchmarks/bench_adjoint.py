"""Adjoint vs direct back-propagation through the same solver: step time, memory, function evaluations.

Memory, as the host measures it per device:

* ``rss_peak_delta_bytes`` (CPU, script mode): peak resident memory of a fresh process during its
  first training step minus before it, sampled every millisecond. A fresh process and no warm-up,
  because the allocator keeps freed heap that a later step would reuse unseen. Includes one-time
  allocations (optimiser state), the same for both sides.
* ``cuda_peak_bytes`` (CUDA): ``torch.cuda.max_memory_allocated`` over one step; the CUDA test is
  skipped without a GPU.

``pytest benchmarks --benchmark-disable`` runs a smoke size (tiny batch, few steps) in seconds.
``NOPROP_BENCH_FULL=1`` selects noprop_cnn, batch 128, at the plugin's default and at the paper's
1000 Euler steps. As a script it prints one table, e.g.::

    python benchmarks/bench_adjoint.py --solver euler --steps 1000 --batch 128
"""

import argparse
import json
import multiprocessing
import os
import threading
import time

import pytest
import torch

from noprop_bench.backbones import create_backbone, feature_dim
from noprop_bench.datasets import Normalizer
from noprop_bench.run.memory import current_rss_bytes
from noprop_bench.task import Task
from noprop_bench_plugins.methods.adjoint import Adjoint

FULL = os.environ.get("NOPROP_BENCH_FULL", "") not in ("", "0")
SETTINGS = ([{"solver": "rk4", "steps": 5}, {"solver": "euler", "steps": 1000}] if FULL
            else [{"solver": "rk4", "steps": 3}])
BATCH = 128 if FULL else 8


def make_method(adjoint: bool, solver: str, steps: int, backbone: str = "noprop_cnn") -> Adjoint:
    torch.manual_seed(0)
    shape = (1, 28, 28)
    make = lambda: create_backbone(backbone, in_chans=1, image_size=28)  # noqa: E731
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    task = Task(num_classes=10, image_shape=shape, device=device, backbone_name=backbone, make_backbone=make,
                backbone_features=feature_dim(make(), shape), normalize=Normalizer((0.1307,), (0.3081,), device))
    params = Adjoint.resolve_params({"adjoint": str(adjoint), "solver": solver, "steps": str(steps)})
    return Adjoint(task, **params)


def make_batch(batch: int, device):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, 28, 28, generator=generator)
    return x.to(device), (torch.arange(batch) % 10).to(device)


def measure(adjoint: bool, solver: str, steps: int, batch: int) -> dict:
    """One warm-up step, then one measured step: time, NFE and the memory figures this device allows."""
    method = make_method(adjoint, solver, steps)
    x, y = make_batch(batch, method.task.device)
    method.train_step(x, y)
    cuda = method.task.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    method.train_step(x, y)
    if cuda:
        torch.cuda.synchronize()
    result = {"gradients": "adjoint" if adjoint else "direct", "solver": solver, "steps": steps, "batch": batch,
              "seconds": time.perf_counter() - started, "nfe_forward": method.dynamics.nfe_forward,
              "nfe_backward": method.dynamics.nfe_backward}
    if cuda:
        result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    return result


def _rss_child(adjoint, solver, steps, batch, threads, queue):
    torch.set_num_threads(threads)
    method = make_method(adjoint, solver, steps)
    x, y = make_batch(batch, method.task.device)
    # no warm-up step: the heap it freed would be reused, hiding the step's memory from RSS
    before = peak = current_rss_bytes()
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.wait(0.001):
            peak = max(peak, current_rss_bytes())

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    method.train_step(x, y)
    done.set()
    watcher.join()
    queue.put(max(peak, current_rss_bytes()) - before)


def rss_peak_delta(adjoint: bool, solver: str, steps: int, batch: int) -> int:
    """Peak RSS growth during one step, in a fresh process so no earlier step's heap is reused."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_rss_child, args=(adjoint, solver, steps, batch, torch.get_num_threads(), queue))
    child.start()
    delta = queue.get()
    child.join()
    return delta


# -- pytest-benchmark -------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _one_thread_when_small():
    threads = torch.get_num_threads()
    if not FULL:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: f"{s['solver']}{s['steps']}")
@pytest.mark.parametrize("adjoint", [True, False], ids=["adjoint", "direct"])
def test_train_step(benchmark, adjoint, setting):
    method = make_method(adjoint, **setting)
    x, y = make_batch(BATCH, method.task.device)
    benchmark.pedantic(method.train_step, args=(x, y), rounds=3 if FULL else 1, warmup_rounds=1 if FULL else 0)
    figures = measure(adjoint, setting["solver"], setting["steps"], BATCH)
    benchmark.extra_info.update(figures)
    assert figures["nfe_forward"] > 0
    assert (figures["nfe_backward"] > 0) == adjoint


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA memory needs a GPU")
def test_cuda_peak_memory_adjoint_below_direct():
    setting = SETTINGS[-1]
    adjoint = measure(True, setting["solver"], setting["steps"], BATCH)
    direct = measure(False, setting["solver"], setting["steps"], BATCH)
    assert adjoint["cuda_peak_bytes"] < direct["cuda_peak_bytes"]


def main():
    parser = argparse.ArgumentParser(description="Adjoint vs direct backprop at the same solver settings")
    parser.add_argument("--solver", default="rk4")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for adjoint in (True, False):
        figures = measure(adjoint, args.solver, args.steps, args.batch)
        if not torch.cuda.is_available():
            figures["rss_peak_delta_bytes"] = rss_peak_delta(adjoint, args.solver, args.steps, args.batch)
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
