"""Block-parallel NoProp-DT: one vectorised step equals T separate block updates on the same batch and noise."""

import copy

import pytest
import torch
from torch import nn

from noprop_bench.errors import UsageError
from noprop_bench_plugins.methods.noprop_dt import NoPropDT
from noprop_bench_plugins.parts.noprop_dt_parallel import parallel_step
from noprop_helpers import first_batch, mnist_shaped_task


def _backbone():
    return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _separate_block_updates(method, x, y, noise):
    """The reference: block t alone, its own loss on z_{t-1} noised with noise[t-1], its own AdamW step."""
    s, W = method.schedule, method.embedding.weight
    u_y = W[y]
    for t in range(1, method.T + 1):
        block = method.blocks[t - 1]
        z_prev = s.abar[t - 1].sqrt() * u_y + (1 - s.abar[t - 1]).sqrt() * noise[t - 1]
        loss = 0.5 * method.T * method.params["eta"] * s.snr_delta[t - 1] * (
            block(block.features(x), z_prev, W) - u_y).pow(2).sum(dim=1).mean()
        method.block_optimizers[t - 1].zero_grad(set_to_none=True)
        loss.backward()
        method.block_optimizers[t - 1].step()


@pytest.mark.parametrize("steps", [1, 3])
def test_parallel_step_equals_separate_block_updates(steps, one_thread):
    torch.manual_seed(0)
    task = mnist_shaped_task(make_backbone=_backbone, features=4)
    parallel = NoPropDT(task, blocks=3, schedule="parallel")
    # SGD in both: a bias feeding batch norm has a true gradient of zero, and AdamW would turn the float
    # rounding noise standing in for it into full-size steps that differ between any two summation
    # orders; the per-block optimiser step itself is the same code either way
    parallel.block_optimizers = [torch.optim.SGD(block.parameters(), lr=0.01) for block in parallel.blocks]
    separate = copy.deepcopy(parallel)
    before = copy.deepcopy(parallel.blocks[0])
    x, y = first_batch(task, 16)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        noise = torch.randn(3, 16, parallel.embedding.dim, generator=generator)
        parallel_step(parallel, parallel.parallel, x, y, noise)
        _separate_block_updates(separate, x, y, noise)
    for index, (a, b) in enumerate(zip(parallel.blocks, separate.blocks)):
        for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
            # vmap batches the blocks' kernels, which may sum in another order: float32 rounding only; the
            # last block's loss weight is ~1000, so its updates are large and its rounding differences too
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5, msg=lambda m: f"block {index + 1} {name}: {m}")
    moved = sum(not torch.equal(p, q) for p, q in zip(parallel.blocks[0].parameters(), before.parameters()))
    assert moved > 0  # the blocks really trained


def test_parallel_schedule_trains_every_block_each_step(one_thread):
    torch.manual_seed(0)
    # with dropout, as the paper's CNN has: each block draws its own masks inside the vectorised call
    task = mnist_shaped_task(make_backbone=lambda: nn.Sequential(_backbone(), nn.Dropout(0.2)), features=4)
    method = NoPropDT(task, blocks=3, schedule="parallel")
    x, y = first_batch(task, 16)
    terms = method.train_step(x, y)
    assert set(terms) == {"loss", "ce", "kl", "denoise"} and torch.isfinite(terms["loss"])
    metrics = method.trial_metrics()
    assert metrics["block_steps"] == [1, 1, 1] and metrics["blocks_trained_per_step"] == 3
    assert metrics["schedule"] == "parallel"
    # every block's activations at once: not the one-at-a-time memory the sequential schedule has
    assert metrics["memory_note"].startswith("every block's activations and gradients at once")
    sequential = NoPropDT(task, blocks=3).trial_metrics()["memory_note"]
    assert sequential.startswith("one block's activations and gradients at a time")


def test_parallel_cannot_offload():
    with pytest.raises(UsageError, match="offload"):
        NoPropDT.resolve_params({"schedule": "parallel", "offload": "true"})
