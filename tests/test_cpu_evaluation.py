"""CPU evaluation in cache-sized batches with channels-last convolution weights: the same predictions as
the plain evaluation (logits to 1e-4), and training resumes on exactly the tensors it left."""

import pytest
import torch
from torch import nn

from noprop_bench.datasets import Split
from noprop_bench.run.evaluation import inference_layout, predictions, split_features, uses_inference_layout
from noprop_bench.run.evaluation_plan import CPU_EVAL_BATCH, CPU_FEATURE_BATCH, EvaluationBatches, evaluation_batches
from noprop_bench.run.speed_settings import SpeedSettings
from noprop_bench_plugins.methods.adjoint import Adjoint
from noprop_bench_plugins.methods.backprop import Backprop
from noprop_bench_plugins.methods.backprop_dt import BackpropDT
from noprop_bench_plugins.methods.noprop_ct import NoPropCT
from noprop_bench_plugins.methods.noprop_dt import NoPropDT
from noprop_bench_plugins.methods.noprop_fm import NoPropFM
from noprop_helpers import first_batch, mnist_shaped_task

TOLERANCE = 1e-4  # channels-last convolutions sum in another order: logits agree to this, not bit for bit

# NoProp-CT and NoProp-FM at their default 1000 inference steps: the tolerance holds through the whole chain
BUILT_INS = [(Backprop, {}), (BackpropDT, {"blocks": 2}), (NoPropCT, {}), (NoPropDT, {"blocks": 3}), (NoPropFM, {}),
             (Adjoint, {"solver": "euler", "steps": 2})]


def _conv_backbone():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _trained(cls, params, steps=2):
    torch.manual_seed(0)
    task = mnist_shaped_task(make_backbone=_conv_backbone, features=8)
    method = cls(task, **cls.resolve_params(params))
    x, y = first_batch(task, 16)
    for _ in range(steps):
        method.train_step(x, y)
    return method, task


def _four_dimensional(method):
    return [p for p in method.parameters() if p.dim() == 4]


@pytest.mark.parametrize("cls, params", BUILT_INS, ids=lambda v: getattr(v, "name", str(v)))
def test_fast_cpu_evaluation_gives_the_plain_predictions(cls, params, one_thread):
    method, task = _trained(cls, params)
    split = Split(task.train_images, task.train_labels)
    plain = predictions(method, split, task.normalize, CPU_EVAL_BATCH, seed=5)
    with inference_layout(method, "cpu", SpeedSettings()):
        assert all(p.is_contiguous(memory_format=torch.channels_last) for p in _four_dimensional(method))
        fast = predictions(method, split, task.normalize, EvaluationBatches(CPU_EVAL_BATCH, 7), seed=5)
    assert fast.shape == plain.shape == (len(split), 10)
    torch.testing.assert_close(fast, plain, rtol=TOLERANCE, atol=TOLERANCE)


def test_the_layout_gives_back_the_very_tensors_training_left(one_thread):
    method, task = _trained(Backprop, {})
    before = {name: (p.data_ptr(), p.stride(), p.detach().clone()) for name, p in method.named_parameters()}
    kept_view = method.backbone[3].weight.data.view(-1)  # e.g. a plugin's cached view of a weight
    with pytest.raises(RuntimeError, match="inside"):
        with inference_layout(method, "cpu", SpeedSettings()):
            assert not method.backbone[3].weight.is_contiguous()
            raise RuntimeError("inside")
    for name, p in method.named_parameters():
        address, stride, values = before[name]
        assert (p.data_ptr(), p.stride()) == (address, stride) and torch.equal(p.detach(), values), name
    assert kept_view.data_ptr() == method.backbone[3].weight.data_ptr()


@pytest.mark.parametrize("cls, params", [(Backprop, {}), (NoPropCT, {"steps": 5})],
                         ids=["backprop", "noprop_ct"])
def test_training_after_a_fast_evaluation_is_training_without_it(cls, params, one_thread):
    with_eval, task = _trained(cls, params, steps=2)
    without, _ = _trained(cls, params, steps=2)
    split = Split(task.train_images, task.train_labels)
    with inference_layout(with_eval, "cpu", SpeedSettings()):
        predictions(with_eval, split, task.normalize, evaluation_batches("cpu", (1, 28, 28)), seed=1)
    x, y = first_batch(task, 16)
    for method in (with_eval, without):
        torch.manual_seed(7)
        method.train_step(x, y)
    for (name, a), (_, b) in zip(with_eval.named_parameters(), without.named_parameters()):
        assert torch.equal(a, b), name


def test_where_the_inference_layout_applies():
    assert uses_inference_layout("cpu", SpeedSettings())
    assert not uses_inference_layout("cuda", SpeedSettings())
    assert not uses_inference_layout("cpu", SpeedSettings(channels_last=True))  # trains in it already
    assert not uses_inference_layout("cpu", SpeedSettings(compile="default"))  # new strides would recompile
    assert evaluation_batches("cpu", (3, 32, 32)) == EvaluationBatches(CPU_EVAL_BATCH, CPU_FEATURE_BATCH)


def test_features_that_draw_random_numbers_leave_the_training_generator_alone(one_thread):
    method, task = _trained(NoPropCT, {"steps": 5})
    honest_features = method.features
    method.features = lambda x: honest_features(x) + 0 * torch.rand(1)  # against the contract: it samples
    state = torch.random.get_rng_state()
    split_features(method, Split(task.train_images, task.train_labels), task.normalize, EvaluationBatches(8, 4))
    assert torch.equal(torch.random.get_rng_state(), state)
