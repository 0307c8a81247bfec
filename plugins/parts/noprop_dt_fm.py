"""What NoProp-DT and NoProp-FM share beyond :mod:`.noprop`: the task's label embedding and checks."""

from typing import Any, Dict, Iterable

from noprop_bench import UsageError
from noprop_bench_plugins.parts.noprop import LabelEmbedding, class_medoids


def label_embedding_for(task, kind: str, dim: int) -> LabelEmbedding:
    """``W_Embed`` for ``task``: one-hot, learned (``dim``) or prototype (class medoids of the training split)."""
    medoids = None
    if kind == "prototype":
        if task.train_images is None or task.train_labels is None:
            raise UsageError("prototype embedding needs the training images to pick class medoids")
        images = task.normalize(task.train_images).flatten(1)
        medoids = class_medoids(images, task.train_labels, task.num_classes)
    return LabelEmbedding(kind, task.num_classes, dim, medoids)


def require_whole(method: str, params: Dict[str, Any], keys: Iterable[str], minimum: int = 1) -> None:
    """Each of ``keys`` must be a whole number of at least ``minimum``."""
    for key in keys:
        value = params[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise UsageError(f"method {method!r}: {key}={value!r} must be a whole number of at least {minimum}")


def require_non_negative(method: str, params: Dict[str, Any], keys: Iterable[str]) -> None:
    """Each of ``keys`` must be a number >= 0."""
    for key in keys:
        if not params[key] >= 0:
            raise UsageError(f"method {method!r}: {key}={params[key]!r} must be >= 0")
