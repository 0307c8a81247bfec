"""noprop_dt[offload=true]: the same training as without offload, with inactive blocks in host memory."""

import pytest
import torch
from torch import nn

from noprop_bench_plugins.methods.noprop_dt import NoPropDT
from noprop_bench_plugins.parts.block_offload import BlockOffload
from noprop_helpers import first_batch, mnist_shaped_task


def train(device, steps=6, **params):
    task = mnist_shaped_task(make_backbone=lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.ReLU()),
                             features=8)
    task.device = torch.device(device)
    torch.manual_seed(0)
    method = NoPropDT(task, **NoPropDT.resolve_params({"blocks": 3, "schedule": "random", **params})).to(device)
    x, y = first_batch(task, 8)
    torch.manual_seed(1)
    for _ in range(steps):
        method.train_step(x.to(device), y.to(device))
    return method


def parameters(method):
    return {name: value.detach().cpu() for name, value in method.state_dict().items()}


def test_offload_trains_exactly_as_without_it_on_the_cpu():
    plain, offloaded = train("cpu"), train("cpu", offload=True)
    for name, value in parameters(plain).items():
        torch.testing.assert_close(value, parameters(offloaded)[name], rtol=0, atol=0, equal_nan=True, msg=name)
    assert offloaded.trial_metrics()["block_moves"] == 0  # on the CPU the host is the device: nothing moves
    assert "host memory" in offloaded.trial_metrics()["memory_note"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to move blocks off")
def test_offload_keeps_one_block_on_the_gpu_and_trains_the_same():
    plain, offloaded = train("cuda"), train("cuda", offload=True)
    devices = [next(block.parameters()).device.type for block in offloaded.blocks]
    assert devices.count("cuda") == 1 and offloaded.trial_metrics()["block_moves"] > 0
    for optimizer, device in zip(offloaded.block_optimizers, devices):
        for state in optimizer.state.values():
            assert state["exp_avg"].device.type == device
    for name, value in parameters(plain).items():
        torch.testing.assert_close(value, parameters(offloaded)[name], equal_nan=True)


def test_offload_must_be_true_or_false():
    from noprop_bench import UsageError
    with pytest.raises(UsageError, match="offload"):
        NoPropDT.resolve_params({"offload": "maybe"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to move blocks off")
def test_a_block_already_on_the_device_named_without_an_index_is_not_moved_again():
    blocks = [nn.Linear(2, 2).cuda(), nn.Linear(2, 2).cuda()]
    offload = BlockOffload(blocks, [None, None], torch.device("cuda"))
    offload.activate(0)  # block 1 goes to the host
    offload.activate(0)  # nothing left to move
    assert offload.moves == 1 and next(blocks[0].parameters()).is_cuda


def test_warm_up_puts_the_block_move_count_back(one_thread):
    from noprop_bench.run.warmup import warm_up

    task = mnist_shaped_task(make_backbone=lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.ReLU()),
                             features=8)
    method = NoPropDT(task, **NoPropDT.resolve_params({"blocks": 3, "offload": True}))
    method.offload.count.moves = 5  # as if blocks had moved before the warm-up
    x, y = first_batch(task, 8)

    def train_step_that_moves(x, y, step=method.train_step):
        method.offload.count.moves += 1  # on the CPU nothing moves: stand in for a transfer
        return step(x, y)

    method.train_step = train_step_that_moves
    warm_up(method, x, y, steps=2)
    assert method.trial_metrics()["block_moves"] == 5
