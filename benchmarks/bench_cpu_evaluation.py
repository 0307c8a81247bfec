"""CPU evaluation: deterministic passes in cache-sized batches with channels-last convolution weights,
against the plain evaluation (batches of 1,000 images, weights as trained), side by side.

Both sides evaluate the same backprop model on random images of the dataset's shape and must give the
same predictions (logits to 1e-4). Rounds alternate between the two; the ratio of the medians is printed
and stored in ``extra_info``, and at full size it must reach ``TARGET_SPEEDUP``. Full size: 2,000 images
of Fashion-MNIST's shape through resnet18 (the backbone of a 120 s Fashion-MNIST trial) and of mnist5k's
through noprop_cnn; smoke size: 128 images, one round.

    NOPROP_BENCH_FULL=1 pytest benchmarks/bench_cpu_evaluation.py -s
"""

import statistics
import time

import pytest
import torch

from noprop_bench.backbones import create_backbone
from noprop_bench.datasets import Normalizer, Split
from noprop_bench.run.evaluation import inference_layout, predictions
from noprop_bench.run.evaluation_plan import CPU_EVAL_BATCH, evaluation_batches
from noprop_bench.run.speed_settings import SpeedSettings
from noprop_bench.task import Task
from noprop_bench_plugins.methods.backprop import Backprop

TARGET_SPEEDUP = 1.2  # measured on the 2-core CPU: about 1.4x for resnet18, 2x for noprop_cnn


def _backprop(backbone: str, images: int) -> Backprop:
    shape = (1, 28, 28)
    generator = torch.Generator().manual_seed(0)
    task = Task(num_classes=10, image_shape=shape, device=torch.device("cpu"), backbone_name=backbone,
                make_backbone=lambda: create_backbone(backbone, in_chans=1, image_size=28),
                backbone_features=create_backbone(backbone, in_chans=1, image_size=28)(torch.zeros(2, *shape)).shape[1],
                normalize=Normalizer((0.5,), (0.25,), "cpu"),
                train_images=torch.randint(0, 256, (images, *shape), dtype=torch.uint8, generator=generator),
                train_labels=torch.arange(images) % 10, seed=0)
    torch.manual_seed(0)
    return Backprop(task)


@pytest.mark.benchmark(group="CPU evaluation")
@pytest.mark.parametrize("backbone", ["resnet18", "noprop_cnn"])
def test_cpu_evaluation_layout_and_batches(benchmark, backbone, smoke):
    images, rounds = (128, 1) if smoke else (2000, 3)
    method = _backprop(backbone, images)
    task = method.task
    split = Split(task.train_images, task.train_labels)
    seconds = {"plain": [], "fast": []}
    logits = {}

    def plain():
        return predictions(method, split, task.normalize, CPU_EVAL_BATCH, seed=0)

    def fast():
        with inference_layout(method, "cpu", SpeedSettings()):
            return predictions(method, split, task.normalize, evaluation_batches("cpu", task.image_shape), seed=0)

    def one_round():
        for name, evaluation in (("plain", plain), ("fast", fast)):
            started = time.perf_counter()
            logits[name] = evaluation()
            seconds[name].append(time.perf_counter() - started)

    benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=0 if smoke else 1)
    torch.testing.assert_close(logits["fast"], logits["plain"], rtol=1e-4, atol=1e-4)
    plain_s, fast_s = statistics.median(seconds["plain"]), statistics.median(seconds["fast"])
    speedup = plain_s / fast_s
    benchmark.extra_info.update({"plain_images_per_s": images / plain_s, "fast_images_per_s": images / fast_s,
                                 "speedup": speedup, "images": images, "threads": torch.get_num_threads()})
    print(f"\nCPU evaluation, backprop on {backbone}, {images} images, {torch.get_num_threads()} threads: plain "
          f"{images / plain_s:.0f} images/s, fast {images / fast_s:.0f} images/s: {speedup:.2f}x "
          f"(medians of {rounds} alternating rounds)")
    if not smoke:
        assert speedup >= TARGET_SPEEDUP
