"""backprop_dt, the paper's Backprop baseline: the chain it computes, end-to-end gradients, labels, bad input."""

import math

import pytest
import torch
from torch import nn

from noprop_bench import UsageError
from noprop_bench_plugins.methods.backprop_dt import BackpropDT
from noprop_helpers import (first_batch, fit_on_mnist5k, held_out_accuracy, mnist_shaped_task,
                            predictions_whole_and_shared)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one thread is faster, and immune to a crowded CI machine."""


def small_backbone():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU())


def make_task(images=None, labels=None):
    return mnist_shaped_task(images, labels, make_backbone=small_backbone, features=32)


def make_method(task=None, **params):
    torch.manual_seed(0)
    return BackpropDT(task or make_task(), **BackpropDT.resolve_params(params))


def test_forward_is_the_papers_chain(monkeypatch):
    method = make_method(blocks=3, mix_init=0.3).eval()
    x, _ = first_batch(method.task, 8)
    targets = [torch.randn(8, 10) for _ in range(3)]
    for block, target in zip(method.blocks, targets):
        monkeypatch.setattr(block, "forward", lambda features, z, W, target=target: target)
    with torch.no_grad():
        method.mix_weights.copy_(torch.tensor([0.2, -0.4, 1.0]))
    captured = {}
    monkeypatch.setattr(method.classifier, "forward", lambda z: captured.setdefault("z", z))
    torch.manual_seed(5)
    with torch.inference_mode():
        method.predict(x)
    torch.manual_seed(5)
    z = torch.randn(8, 10)  # z_0 ~ N(0, I)
    for w, u in zip([0.2, -0.4, 1.0], targets):
        a = math.tanh(w)
        z = (1 - a) * z + a * u
    torch.testing.assert_close(captured["z"], z)


def test_mixing_weights_start_at_mix_init():
    method = make_method(blocks=4, mix_init=0.5)
    torch.testing.assert_close(torch.tanh(method.mix_weights.detach()), torch.full((4,), 0.5))


@pytest.mark.parametrize("embedding", ["one-hot", "learned", "prototype"])
def test_one_loss_trains_everything_end_to_end(embedding):
    method = make_method(blocks=3, embedding=embedding)
    before = {name: p.detach().clone() for name, p in method.named_parameters()}
    x, y = first_batch(method.task, 16)
    method.train_step(x, y)
    unchanged = [name for name, p in method.named_parameters() if torch.equal(p, before[name])]
    assert unchanged == [], "every block, the mixing weights, the classifier and a learned W_Embed get gradients"


def test_prediction_from_shared_features_is_the_chain_on_the_images():
    """Both ways into inference (the images, or their cached features) give the classifier's logits on z_T,
    chained from z_0 ~ N(0, I) as z_t = (1 - a_t) z_{t-1} + a_t u_t(z_{t-1}, x), each block on the images."""
    method = make_method(blocks=3, embedding="learned").eval()
    x, _ = first_batch(method.task, 8)
    W = method.embedding.weight
    with torch.inference_mode():
        torch.manual_seed(3)
        z = torch.randn(len(x), W.shape[1])
        for w_t, block in zip(method.mix_weights, method.blocks):
            a_t = torch.tanh(w_t)
            z = (1 - a_t) * z + a_t * block(block.features(x), z, W)
        reference = method.classifier(z)
    whole, shared = predictions_whole_and_shared(method, x)
    assert torch.equal(whole, reference) and torch.equal(shared, reference)


def test_row_labels_are_the_papers():
    assert BackpropDT.row_label(BackpropDT.resolve_params({})) == "Backprop (one-hot)"
    assert BackpropDT.row_label(BackpropDT.resolve_params({"embedding": "learned"})) == "Backprop (dim=20)"
    assert BackpropDT.row_label(BackpropDT.resolve_params({"embedding": "prototype"})) == "Backprop (prototype)"
    assert BackpropDT.family == "discrete-time"


@pytest.mark.parametrize("given", [{"mix_init": "1.0"}, {"blocks": "0"}, {"embedding": "two-hot"}, {"lr": "-1"}])
def test_bad_parameters_are_usage_errors(given):
    with pytest.raises(UsageError):
        BackpropDT.resolve_params(given)


def test_learns_mnist5k_briefly():
    """Far above chance (10 %) after a short run; the noisy z_0 makes the chain slower to start than a linear head."""
    method, x, y = fit_on_mnist5k(make_task, make_method, steps=120, batch_size=64, blocks=2)
    assert held_out_accuracy(method, x, y) > 0.3
