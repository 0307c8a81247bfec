"""Training and inference throughput of every built-in method on the same backbone and batch.

Each method trains on the same MNIST-shaped batch of 128 with backbone ``noprop_cnn``; the train-step
benchmarks share one group, so the report's medians compare methods directly (samples/s =
128 / median). Inference: NoProp-CT at several step counts with Heun, and the adjoint baseline's
function evaluations per training step (``extra_info``).

    NOPROP_BENCH_FULL=1 pytest benchmarks/bench_methods.py --benchmark-columns=median,iqr,ops
"""

import pytest
import torch

from noprop_bench.run.budget import Budget
from noprop_bench.plugins import load_plugins
from noprop_bench.run.runner import RunData, TrialSpec, build_task
from noprop_bench_plugins.datasets.mnist5k import MNIST5k

BUILT_IN = ("backprop", "noprop_dt", "adjoint", "noprop_ct", "noprop_fm")


@pytest.fixture(scope="module")
def data():
    return RunData.load(MNIST5k(), torch.device("cpu"))


@pytest.fixture(scope="module")
def registry():
    return load_plugins()


def build(registry, data, name, batch, **given):
    cls = registry.method(name)
    spec = TrialSpec(method=cls, params=cls.resolve_params(given), dataset="mnist5k", backbone="noprop_cnn",
                     budget=Budget.parse("1steps"), seed=0, batch_size=batch, device=torch.device("cpu"),
                     augment="none")
    torch.manual_seed(0)
    return cls(build_task(spec, data), **spec.params)


def batch_of(data, size):
    return data.normalize(data.train.images[:size]), data.train.labels[:size]


@pytest.mark.benchmark(group="train step, noprop_cnn")
@pytest.mark.parametrize("name", BUILT_IN)
def test_train_step(benchmark, data, registry, name, smoke):
    size = 16 if smoke else 128
    method = build(registry, data, name, size)
    x, y = batch_of(data, size)
    benchmark.pedantic(method.train_step, args=(x, y), rounds=1 if smoke else 20, warmup_rounds=0 if smoke else 2)
    benchmark.extra_info["batch"] = size
    if name == "adjoint":
        benchmark.extra_info.update(method.trial_metrics())


@pytest.mark.benchmark(group="NoProp-CT inference, heun")
@pytest.mark.parametrize("steps", [2, 10, 40, 100])
def test_noprop_ct_inference(benchmark, data, registry, steps, smoke):
    size = 16 if smoke else 1000
    method = build(registry, data, "noprop_ct", 128).eval()
    x, _ = batch_of(data, size)

    def predict():
        with torch.inference_mode():
            return method.predict(x, solver="heun", steps=steps if not smoke else 2)

    benchmark.pedantic(predict, rounds=1 if smoke else 5)
    benchmark.extra_info.update({"images": size, "steps": steps})
