"""The paper's training protocol as data (reference section 5.1): epochs per method and dataset.

``--budget paper`` gives each method the paper's epochs for the dataset's kind: MNIST's for MNIST-like
data (mnist, mnist5k, fashion_mnist and any one-channel 28x28 image folder), CIFAR-100's for 100
classes, CIFAR-10's for other 10-class data.
"""

from .errors import UsageError
from .run.budget import Budget

PAPER_BUDGET = "paper"
MNIST_LIKE = ("mnist", "mnist5k", "fashion_mnist")
# epochs of the paper's hyperparameter table; the linear-head ``backprop`` trains like the paper's Backprop
PAPER_EPOCHS = {
    "backprop_dt": {"MNIST": 100, "CIFAR-10": 150, "CIFAR-100": 150},
    "backprop": {"MNIST": 100, "CIFAR-10": 150, "CIFAR-100": 150},
    "noprop_dt": {"MNIST": 100, "CIFAR-10": 150, "CIFAR-100": 150},
    "adjoint": {"MNIST": 2, "CIFAR-10": 4, "CIFAR-100": 4},
    "noprop_ct": {"MNIST": 100, "CIFAR-10": 500, "CIFAR-100": 1000},
    "noprop_fm": {"MNIST": 100, "CIFAR-10": 500, "CIFAR-100": 1000},
}


def paper_dataset_kind(dataset) -> str:
    """``MNIST``, ``CIFAR-10`` or ``CIFAR-100``: whose row of the paper's table ``dataset`` trains by."""
    shape = tuple(dataset.image_shape)
    if dataset.name in MNIST_LIKE or shape == (1, 28, 28):
        return "MNIST"
    if dataset.num_classes == 100:
        return "CIFAR-100"
    if dataset.num_classes == 10:
        return "CIFAR-10"
    raise UsageError(f"--budget paper: the paper trained on MNIST, CIFAR-10 and CIFAR-100 only; "
                     f"{dataset.name} has {dataset.num_classes} classes and {shape} images, so it has no "
                     f"epoch count. Give --budget Nepochs instead")


def paper_budget(method: str, dataset) -> Budget:
    """The paper's epochs for ``method`` on ``dataset``, as a budget named ``paper``."""
    epochs = PAPER_EPOCHS.get(method)
    if epochs is None:
        raise UsageError(f"--budget paper: the paper gives no epochs for method {method!r} (it has "
                         f"{', '.join(PAPER_EPOCHS)}); give --budget Nepochs instead")
    return Budget(epochs[paper_dataset_kind(dataset)], "epochs", PAPER_BUDGET)
