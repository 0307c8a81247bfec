"""The paper's training protocol as data (reference sections 5.1 and 6): epochs, rows and settings.

``--budget paper`` gives each method the paper's epochs for the dataset's kind: MNIST's for MNIST-like
data (mnist, mnist5k, fashion_mnist and any one-channel 28x28 image folder), CIFAR-100's for 100
classes, CIFAR-10's for other 10-class data.
"""

import argparse
import copy

from .errors import UsageError
from .report.paper import PAPER_SEEDS
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


# -- --preset paper --------------------------------------------------------------------------------
PRESETS = ("paper",)
# the 13 method rows of the paper's Table 1: five methods with their embeddings, the adjoint one-hot only
PAPER_ROWS = ",".join(
    [f"{method}{embedding}" for method in ("backprop_dt", "noprop_dt")
     for embedding in ("", "[embedding=learned]", "[embedding=prototype]")]
    + ["adjoint"]
    + [f"{method}{embedding}" for method in ("noprop_ct", "noprop_fm")
       for embedding in ("", "[embedding=learned]", "[embedding=prototype]")])
# each method's optimiser settings from the paper's table (reference sections 5.1 and 6); the
# optimisers themselves (AdamW for Backprop, DT, adjoint; Adam for CT, FM) are the methods' own
PAPER_METHOD_PARAMS = {
    "backprop_dt": {"lr": "0.001", "weight_decay": "0.001", "blocks": "10", "dim": "20"},
    "noprop_dt": {"lr": "0.001", "weight_decay": "0.001", "blocks": "10", "eta": "0.1", "dim": "20"},
    "adjoint": {"lr": "0.001", "weight_decay": "0.001", "solver": "euler", "steps": "1000"},
    "noprop_ct": {"lr": "0.001", "weight_decay": "0.001", "eta": "1.0", "steps": "1000", "dim": "20"},
    "noprop_fm": {"lr": "0.001", "weight_decay": "0.001", "steps": "1000", "dim": "20"},
}
# the run options the preset sets (argparse destinations), and how each reads on the command line
PAPER_OPTIONS = {"backbone": "noprop_cnn", "augment": "none", "seeds": PAPER_SEEDS, "inference_runs": 5,
                 "train_accuracy": True, "budget": PAPER_BUDGET, "batch_size": 128, "val_split": 0.0}
OPTION_FLAGS = {"backbone": "--backbone", "augment": "--augment", "seeds": "--seeds",
                "inference_runs": "--inference-runs", "train_accuracy": "--train-accuracy", "budget": "--budget",
                "batch_size": "--batch-size", "val_split": "--val-split"}


def apply_preset(args, explicit) -> list:
    """Set the preset's options on ``args`` except those given ``explicit``-ly; returns what the explicit ones
    changed, e.g. ``["--budget 20"]`` (empty when the run is the paper's protocol)."""
    overrides = []
    for dest, value in PAPER_OPTIONS.items():
        if dest not in explicit:
            setattr(args, dest, value)
        elif dest == "seeds":
            continue  # how many trials run, not how one trains: Table 1 gives a difference only at 3 or more
        elif getattr(args, dest) != value:
            flag = OPTION_FLAGS[dest]
            if isinstance(value, bool):
                overrides.append(flag if getattr(args, dest) else f"--no-{flag[2:]}")
            else:
                overrides.append(f"{flag} {getattr(args, dest)}")
    if "methods" not in explicit:
        args.methods = PAPER_ROWS
    return overrides


def preset_method_params(method: str, given: dict) -> dict:
    """``given`` on top of the paper's settings for ``method`` (none for a method the paper never ran)."""
    return {**PAPER_METHOD_PARAMS.get(method, {}), **given}


def method_override(cls, params: dict) -> str:
    """``""`` when ``params`` are the paper's for ``cls`` and its embedding, else ``name[key=value,...]`` of
    what differs (a method the paper never ran differs as a whole)."""
    if cls.name not in PAPER_METHOD_PARAMS:
        return cls.name
    reference = cls.resolve_params(preset_method_params(cls.name, {"embedding": params.get("embedding", "one-hot")}))
    differing = [f"{key}={params[key]}" for key in params if params[key] != reference.get(key)]
    return f"{cls.name}[{','.join(differing)}]" if differing else ""


def explicit_options(parser, argv) -> set:
    """The argparse destinations ``argv`` sets explicitly (abbreviated flags included)."""
    probe = copy.deepcopy(parser)
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    namespace, _ = probe.parse_known_args(argv)
    return set(vars(namespace))
