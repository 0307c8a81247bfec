"""Shared pieces of the NoProp method tests: small MNIST-shaped tasks and a brief training run on mnist5k."""

import torch

from noprop_bench.datasets import Normalizer
from noprop_bench.task import Task
from noprop_bench_plugins.datasets.mnist5k import MNIST5k


def mnist_shaped_task(images=None, labels=None, *, make_backbone, features, backbone_name="small", seed=0,
                      device="cpu"):
    """A 10-class 1x28x28 task on ``device``; without ``images``, 40 random images with labels 0..9 in turn."""
    if images is None:
        generator = torch.Generator().manual_seed(seed)
        images = torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8, generator=generator)
        labels = torch.arange(40) % 10
    return Task(num_classes=10, image_shape=(1, 28, 28), device=torch.device(device), backbone_name=backbone_name,
                make_backbone=make_backbone, backbone_features=features,
                normalize=Normalizer((0.1307,), (0.3081,), device), train_images=images.to(device),
                train_labels=labels.to(device), seed=seed)


def first_batch(task, n=32):
    return task.normalize(task.train_images[:n]), task.train_labels[:n]


def fit_on_mnist5k(make_task, make_method, steps, batch_size, **params):
    """Train on 3000 of mnist5k's training images; returns the method (in eval mode) and the other 1000."""
    split = MNIST5k().load("train")
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(split), generator=generator)
    fit, held = order[:3000], order[3000:]
    task = make_task(split.images[fit], split.labels[fit])
    method = make_method(task, **params)
    method.train()
    for _ in range(steps):
        index = torch.randint(0, 3000, (batch_size,), generator=generator)
        method.train_step(task.normalize(task.train_images[index]), task.train_labels[index])
    method.eval()
    return method, task.normalize(split.images[held]), split.labels[held]


def held_out_accuracy(method, x, y, **setting):
    torch.manual_seed(1)
    with torch.inference_mode():
        return (method.predict(x, **setting).argmax(dim=1) == y).float().mean().item()


def predictions_whole_and_shared(method, x, **setting):
    """``predict(x)`` and ``predict_from_features(features(x))`` from the same RNG state."""
    with torch.inference_mode():
        torch.manual_seed(3)
        whole = method.predict(x, **setting)
        torch.manual_seed(3)
        shared = method.predict_from_features(method.features(x), **setting)
    return whole, shared
