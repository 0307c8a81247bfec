"""Tiny synthetic data for the conformance checks: a task, batches, and a plugin the executor check runs."""

from pathlib import Path
from typing import Tuple

import torch
from torch import nn

from ..datasets import Dataset, Normalizer, Split
from ..hookspecs import hookimpl
from ..method import Method
from ..task import Task

NUM_CLASSES = 3
IMAGE_SHAPE = (1, 16, 16)  # the smallest the paper's CNN takes, for the executor check
BACKBONE_FEATURES = 16


def tiny_images(count: int, seed: int) -> Split:
    """``count`` uint8 images of ``IMAGE_SHAPE``, each class a brighter band of rows, plus noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % NUM_CLASSES
    images = torch.randint(0, 60, (count, *IMAGE_SHAPE), generator=generator)
    band = IMAGE_SHAPE[1] // NUM_CLASSES
    for label in range(NUM_CLASSES):
        images[labels == label, :, label * band:(label + 1) * band, :] += 150
    return Split(images.to(torch.uint8), labels)


def tiny_backbone() -> nn.Module:
    """A small feature extractor, ``[B, 1, 16, 16] -> [B, BACKBONE_FEATURES]``, in place of a timm model."""
    return nn.Sequential(nn.Flatten(), nn.Linear(IMAGE_SHAPE[0] * IMAGE_SHAPE[1] * IMAGE_SHAPE[2], BACKBONE_FEATURES),
                         nn.ReLU())


def tiny_task(device="cpu", seed: int = 0, train_size: int = 48) -> Task:
    """A :class:`~noprop_bench.Task` of ``NUM_CLASSES`` classes of 1x16x16 images on ``device``."""
    device = torch.device(device)
    train = tiny_images(train_size, seed=1000 + seed).to(device)
    return Task(num_classes=NUM_CLASSES, image_shape=IMAGE_SHAPE, device=device, backbone_name="tiny-mlp",
                make_backbone=tiny_backbone, backbone_features=BACKBONE_FEATURES,
                normalize=Normalizer((0.5,), (0.25,), device), train_images=train.images,
                train_labels=train.labels, seed=seed)


def tiny_batch(task: Task, size: int = 8, seed: int = 7) -> Tuple[torch.Tensor, torch.Tensor]:
    """A normalised batch ``(x, y)`` on the task's device, as ``train_step`` and ``predict`` receive it."""
    split = tiny_images(size, seed=seed).to(task.device)
    return task.normalize(split.images), split.labels


class ConformanceDataset(Dataset):
    """A few dozen tiny images: the data the executor check's trials train on."""

    name = "conformance_tiny"
    label = "Conformance"
    classes = tuple("abc"[:NUM_CLASSES])
    image_shape = IMAGE_SHAPE
    mean, std = (0.5,), (0.25,)

    def load(self, split: str) -> Split:
        return tiny_images(48 if split == "train" else 24, seed=0 if split == "train" else 1)


class ConformanceMethod(Method):
    """A linear classifier on pixels: the method the executor check's trials train."""

    name = "conformance_linear"
    label = "Conformance"
    defaults = {"lr": 0.1, "began_dir": ""}  # began_dir: where each trial that begins leaves a file seed-N

    def __init__(self, task, **params):
        super().__init__(task, **params)
        if self.params.get("began_dir"):  # subclasses may have defaults of their own
            Path(self.params["began_dir"], f"seed-{task.seed}").touch()
        self.layer = nn.Linear(task.image_dim, task.num_classes).to(task.device)
        self.optimizer = torch.optim.SGD(self.parameters(), lr=self.params["lr"])

    def train_step(self, x, y):
        loss = nn.functional.cross_entropy(self.layer(x.flatten(1)), y)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.detach()}

    def predict(self, x):
        return self.layer(x.flatten(1))


@hookimpl
def register_methods(register):
    register(ConformanceMethod)


@hookimpl
def register_datasets(register):
    register(ConformanceDataset)

