"""Host bookkeeping of a replayed training update under ``--compile`` on CUDA: all that ``CapturedCall`` does
per call besides the graph launch (the signature: argument shapes, parameter and buffer storages, module
modes, optimiser hyperparameters; the check that the optimisers still hold the state tensors the graph
writes to; copying the batch in and the metrics out).

On the CPU the replay is a no-op stand-in, so what is timed is the Python a GPU step pays on top of its
graph. It is set against one walk over the method's parameters and buffers, what every signature paid
before the walk was cached, measured side by side in the same run; at full size the bookkeeping must cost
less than ``TARGET_FRACTION`` of a walk. Full size: backprop on resnet18 at the CIFAR-10 shape and NoProp-DT
with 10 blocks on noprop_cnn; smoke size: backprop on a small linear backbone.

    NOPROP_BENCH_FULL=1 pytest benchmarks/bench_captured_updates.py --benchmark-columns=median,iqr
"""

import statistics
import time

import pytest
import torch
from torch import nn

from noprop_bench.backbones import create_backbone
from noprop_bench.datasets import Normalizer
from noprop_bench.run.cuda_graphs import CapturedCall, Recording
from noprop_bench.run.runner import backbone_width
from noprop_bench.task import Task
from noprop_bench_plugins.methods.backprop import Backprop
from noprop_bench_plugins.methods.noprop_dt import NoPropDT

TARGET_FRACTION = 0.6  # resnet18 backprop on the 2-core CPU: about 0.3 (52 us against 176 us)


def _task(backbone: str, shape, make_backbone=None, features=None) -> Task:
    torch.manual_seed(0)
    images = torch.randint(0, 256, (40, *shape), dtype=torch.uint8)
    return Task(num_classes=10, image_shape=shape, device=torch.device("cpu"), backbone_name=backbone,
                make_backbone=make_backbone or (lambda: create_backbone(backbone, shape[0], shape[1])),
                backbone_features=features or 512, normalize=Normalizer((0.5,) * shape[0], (0.25,) * shape[0],
                                                                        torch.device("cpu")),
                train_images=images, train_labels=torch.arange(40) % 10, seed=0)


def _case(name: str):
    """(method, the attribute its update is, the update's arguments), after one real step so the optimisers
    hold their state."""
    if name == "small":
        task = _task("small", (1, 28, 28), lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 32)), 32)
        method, path = Backprop(task, **Backprop.resolve_params({})), "train_step"
    elif name == "resnet18":
        method, path = Backprop(_task("resnet18", (3, 32, 32)), **Backprop.resolve_params({})), "train_step"
    else:
        task = _task("noprop_cnn", (1, 28, 28), features=backbone_width("noprop_cnn", (1, 28, 28)))
        method, path = NoPropDT(task, **NoPropDT.resolve_params({"blocks": "10"})), "block_update"
    x, y = method.task.normalize(method.task.train_images[:4]), method.task.train_labels[:4]
    args = (x, y) if path == "train_step" else (1, x, y)
    method.train()
    getattr(method, path)(*args)
    return method, path, args


def _no_op_recorder(function, args, kwargs, after_warmup=None):
    return Recording(lambda: None, tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args), dict(kwargs),
                     {"loss": torch.zeros(())})


def _median_seconds(call, repeats: int = 300) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


@pytest.mark.parametrize("case", ["resnet18", "noprop_dt"])
def test_a_replayed_updates_bookkeeping_costs_less_than_walking_the_parameters(benchmark, smoke, case):
    case = "small" if smoke else case
    method, path, args = _case(case)
    call = CapturedCall(path, getattr(method, path), method, lambda *reason: pytest.fail(str(reason)),
                        record=_no_op_recorder, device_type="cpu", update=True)
    call(*args)  # records
    benchmark(call, *args)
    walk = _median_seconds(lambda: list(method.parameters()) + list(method.buffers()))
    bookkeeping = _median_seconds(lambda: call(*args))
    fraction = bookkeeping / walk
    benchmark.extra_info.update(bookkeeping_us=bookkeeping * 1e6, walk_us=walk * 1e6, fraction=fraction)
    print(f"\n{case}: bookkeeping {bookkeeping * 1e6:.1f} us per call, a parameter walk {walk * 1e6:.1f} us "
          f"({fraction:.2f})")
    assert call.record is not None and call.eager_calls == 0 and call.recorded == 1
    if not smoke:
        assert fraction < TARGET_FRACTION
