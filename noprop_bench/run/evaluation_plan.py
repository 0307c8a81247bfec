"""What an evaluation looks at and in what batches: stratified subsets and device-sized batches.

Checkpoint evaluations during training may look at a fixed, stratified subset of the test split
(``--checkpoint-size``); the final evaluation always sees the whole split. ``--train-accuracy`` looks at
a fixed, stratified subset of the training split of at most twice the test split's size, so it costs at
most about twice the test evaluation. Evaluation batches are sized from free device memory on CUDA,
except the passes that sample from a method's cached features: they take a fixed batch,
:data:`CUDA_FEATURE_SAMPLING_BATCH`, as a method's draws depend on its batch, and a seed must give the same
accuracy on every GPU. On the CPU, passes that sample
keep the fixed size every CPU evaluation has used, so their random draws (and results) do not move, and
deterministic passes use small batches that stay in cache.
"""

from dataclasses import dataclass
from typing import Tuple, Union

import torch

from ..datasets import Split

DEFAULT_CHECKPOINT_SIZE = 2000
CPU_EVAL_BATCH = 1000  # the batch every CPU evaluation has always used: stochastic predictions stay identical
CPU_FEATURE_BATCH = 64  # deterministic passes on the CPU: small enough for the activations to stay in cache
CUDA_EVAL_BATCH_MAX = 16384
# sampling from cached features: a few floats per image (resnet18's 512, NoProp-DT's T paths), so a whole
# test split fits one batch on any GPU, and the size cannot depend on the device's free memory
CUDA_FEATURE_SAMPLING_BATCH = 16384
CUDA_FREE_MEMORY_SHARE = 0.25  # evaluation may take this share of the memory free when the trial starts
TRAIN_ACCURACY_FACTOR = 2
SUBSET_SEED = 54321  # fixed, so every method and seed of a run looks at the same images


def stratified_indices(labels: torch.Tensor, fraction: float, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Indices (sorted) left and taken when ``fraction`` of every class (at least one image) is taken."""
    generator = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    keep, taken = [], []
    for label in labels.unique():
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        count = min(len(members), max(1, int(round(fraction * len(members)))))
        taken.append(members[:count])
        keep.append(members[count:])
    return torch.cat(keep).sort().values, torch.cat(taken).sort().values


def stratified_subset(split: Split, size: int, seed: int = SUBSET_SEED) -> Split:
    """About ``size`` images of ``split`` in its class proportions; the whole split if ``size`` is 0 or
    not smaller than it."""
    if size <= 0 or size >= len(split):
        return split
    _, taken = stratified_indices(split.labels, size / len(split), seed)
    taken = taken.to(split.labels.device)
    return Split(split.images.index_select(0, taken), split.labels.index_select(0, taken))


def train_accuracy_split(train: Split, test_size: int) -> Split:
    """The part of the training split ``--train-accuracy`` measures: at most twice the test split."""
    return stratified_subset(train, TRAIN_ACCURACY_FACTOR * test_size)


def image_bytes_estimate(image_shape) -> int:
    """A generous per-image memory estimate for inference: the image's floats times a backbone's
    activation blow-up (resnet18 at 32 px holds about 100 times its input at its widest point)."""
    channels, height, width = image_shape
    return max(channels, 3) * height * width * 4 * 256


@dataclass(frozen=True)
class EvaluationBatches:
    """Images per forward pass at evaluation: ``stochastic`` for passes that sample, ``deterministic``
    for the rest (see the module's docstring)."""

    stochastic: int
    deterministic: int

    @classmethod
    def of(cls, batches: Union[int, "EvaluationBatches"]) -> "EvaluationBatches":
        """``batches`` itself, or one size for both kinds of pass."""
        return batches if isinstance(batches, EvaluationBatches) else cls(batches, batches)

    def halved(self) -> "EvaluationBatches":
        """Half of each size (at least one image): the retry after the device ran out of memory."""
        return EvaluationBatches(max(1, self.stochastic // 2), max(1, self.deterministic // 2))


def evaluation_batch_size(device: torch.device, image_shape) -> int:
    """Images per evaluation batch: the fixed CPU size, or on CUDA a share of the free memory."""
    device = torch.device(device)
    if device.type != "cuda":
        return CPU_EVAL_BATCH
    free, _ = torch.cuda.mem_get_info(device)
    # memory torch's allocator keeps cached from earlier trials is free to this one: without it, a trial's
    # batches (and so the draws of a stochastic method) would depend on what ran before it in the process
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    fitting = int(free * CUDA_FREE_MEMORY_SHARE) // image_bytes_estimate(image_shape)
    return max(CPU_EVAL_BATCH, min(CUDA_EVAL_BATCH_MAX, fitting))


def evaluation_batches(device: torch.device, image_shape, samples_features: bool = False) -> EvaluationBatches:
    """The batches of a trial's evaluations: on the CPU the fixed size for passes that sample and
    :data:`CPU_FEATURE_BATCH` for deterministic ones; on CUDA the memory-sized batch for both, except that a
    method that samples from cached features (``samples_features``) samples in the fixed
    :data:`CUDA_FEATURE_SAMPLING_BATCH`, so its draws are the same on every GPU."""
    size = evaluation_batch_size(device, image_shape)
    if torch.device(device).type == "cpu":
        return EvaluationBatches(size, CPU_FEATURE_BATCH)
    return EvaluationBatches(CUDA_FEATURE_SAMPLING_BATCH if samples_features else size, size)
