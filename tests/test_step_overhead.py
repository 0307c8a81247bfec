"""Per-step overhead: clock reads that stop a trial within one step of its budget, fused CUDA optimisers."""

import pytest
import torch

from noprop_bench.run.budget import ClockReads
from noprop_bench_plugins.parts.optim import optimizer_options


@pytest.mark.parametrize("step_seconds", [0.01, 0.003, 0.07])
def test_clock_reads_stop_within_one_step_and_read_rarely(step_seconds):
    reads, count, steps, spent = ClockReads(8), 0, 0, 0.0
    while spent < 1.0:
        steps += 1
        if reads.due(steps):
            count += 1
            spent = steps * step_seconds  # a budget of 1 s
            reads.read(steps, spent)
    deadline = -(-1.0 // step_seconds)  # the first step at which 1 s is spent
    assert deadline <= steps <= deadline + 1
    # far from the end a read every 8 steps; near it, a read planned to land on the deadline, then one more
    assert count <= steps // 8 + 3


def test_every_step_reads_where_reads_are_free():
    reads = ClockReads(1)
    for step in range(1, 5):
        assert reads.due(step)
        reads.read(step, 0.01 * step)


def test_optimizers_fused_on_cuda_only():
    assert optimizer_options("cpu") == {}
    assert optimizer_options(torch.device("cuda")) == {"fused": True}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_adam_steps_on_cuda():
    parameter = torch.nn.Parameter(torch.ones(3, device="cuda"))
    optimizer = torch.optim.AdamW([parameter], lr=0.1, **optimizer_options("cuda"))
    parameter.sum().backward()
    optimizer.step()
    assert optimizer.defaults["fused"] and (parameter < 1).all()
