"""Training-batch throughput: the in-memory tensor pipeline against a classic DataLoader.

Both sides serve the same CIFAR-shaped uint8 data (random pixels) as normalised float batches of 128
with random crop (4-pixel padding) and horizontal flip. The DataLoader side is torchvision's usual
recipe: PIL images, ``RandomCrop``, ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize``, per sample.
Every benchmark in the group serves the same number of samples per round, so the ratio of medians
in the report is the ratio of samples/s; each test also records ``samples_per_s`` in extra_info.

    NOPROP_BENCH_FULL=1 pytest benchmarks/bench_pipeline.py --benchmark-columns=median,iqr,rounds

On a busy shared CPU, ``OMP_NUM_THREADS=1`` gives steadier numbers: small batch operations split over
two threads wait for whichever core is taken by someone else.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from noprop_bench.datasets import BatchStream, Normalizer, Split

BATCH = 128
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def sizes(smoke: bool):
    """(images in the dataset, batches per round): tiny unless NOPROP_BENCH_FULL=1 asks for measuring sizes."""
    return (2 * BATCH, 2) if smoke else (10_000, 40)


def cifar_like(images: int) -> Split:
    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.integers(0, 256, (images, 3, 32, 32), dtype=np.uint8))
    return Split(pixels, torch.from_numpy(rng.integers(0, 10, images)))


class PilDataset(torch.utils.data.Dataset):
    """What ``torchvision.datasets.CIFAR10`` does per item: a PIL image through the transforms."""

    def __init__(self, split: Split, transform):
        self.images = split.images.permute(0, 2, 3, 1).numpy()  # HWC, as torchvision keeps CIFAR
        self.labels = split.labels.tolist()
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


def endless(loader):
    while True:
        yield from loader


def measure(benchmark, next_batch, batches: int):
    def serve():
        for _ in range(batches):
            images, labels = next_batch()
        return images

    images = benchmark.pedantic(serve, rounds=5, warmup_rounds=1)  # under --benchmark-disable: once
    assert images.shape == (BATCH, 3, 32, 32) and images.dtype == torch.float32
    if not benchmark.disabled:
        benchmark.extra_info["samples_per_s"] = round(batches * BATCH / benchmark.stats.stats.median)


@pytest.mark.benchmark(group="pipeline: CIFAR-shaped, batch 128, crop+flip+normalize")
def test_tensor_pipeline(benchmark, smoke):
    images, batches = sizes(smoke)
    stream = BatchStream(cifar_like(images), BATCH, Normalizer(MEAN, STD, "cpu"), "crop_flip", seed=0)
    measure(benchmark, stream.next, batches)


@pytest.mark.benchmark(group="pipeline: CIFAR-shaped, batch 128, crop+flip+normalize")
@pytest.mark.parametrize("workers", [0, 2])
def test_dataloader_torchvision_transforms(benchmark, smoke, workers):
    images, batches = sizes(smoke)
    transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    loader = DataLoader(PilDataset(cifar_like(images), transform), batch_size=BATCH, shuffle=True,
                        drop_last=True, num_workers=workers, persistent_workers=workers > 0)
    batches_left = endless(loader)
    measure(benchmark, lambda: next(batches_left), batches)
