"""The paper's published numbers (Li, Teh, Pascanu 2025: Table 1 and the memory table), kept as package data."""

from functools import lru_cache
from importlib import resources
from io import StringIO
from typing import Any, Dict, Optional, Tuple

import pandas as pd

# only names we know are the paper's datasets; mnist5k is a subset, so comparisons with it are indicative
PAPER_DATASETS = {"mnist": "MNIST", "mnist5k": "MNIST", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
SUBSET_DATASETS = {"mnist5k": "a 5k-image subset of MNIST"}
PAPER_SEEDS = 3  # trained models per cell of the paper's Table 1
PAPER_STATISTIC = f"{PAPER_SEEDS} seeds × 5 inference runs, full training schedules (paper Table 1)"
# the methods the paper ran, by our method name: only these are paired with its rows (never by label, so
# the linear-head ``backprop``, once labelled "Backprop (one-hot)", is never set beside the paper's Backprop)
PAPER_METHODS = {"backprop_dt": "Backprop", "noprop_dt": "NoProp-DT", "adjoint": "Adjoint",
                 "noprop_ct": "NoProp-CT", "noprop_fm": "NoProp-FM"}


def paper_method_label(method: str) -> Optional[str]:
    """The paper's name for one of our methods (``backprop_dt`` -> ``Backprop``), or None if it never ran it."""
    return PAPER_METHODS.get(str(method))


def paper_row_label(record: Dict[str, Any]) -> Optional[str]:
    """The paper's Table 1 row a trial record corresponds to (``NoProp-CT (dim=20)``), or None."""
    label = paper_method_label(record.get("method", ""))
    if label is None:
        return None
    params = record.get("params") if isinstance(record.get("params"), dict) else {}
    embedding = params.get("embedding", "one-hot")
    if embedding == "learned":
        embedding = f"dim={params.get('dim', 20)}"
    return f"{label} ({embedding})"


@lru_cache(maxsize=1)
def paper_numbers() -> pd.DataFrame:
    """Columns ``table`` (``table1`` | ``memory_gb``), ``method``, ``embedding``, ``dataset``, ``split``,
    ``mean``, ``se``; the row label is ``method (embedding)`` as in the paper."""
    text = resources.files("noprop_bench.report").joinpath("paper_numbers.csv").read_text(encoding="utf-8")
    frame = pd.read_csv(StringIO(text), dtype={"embedding": str, "split": str}, keep_default_na=False,
                        na_values={"mean": [""], "se": [""]})
    frame["row_label"] = [f"{m} ({e})" if e else m for m, e in zip(frame["method"], frame["embedding"])]
    return frame


def paper_dataset(dataset_spec: str) -> Optional[str]:
    """The paper's name for one of our dataset specs, or None when the paper has no such dataset."""
    return PAPER_DATASETS.get(str(dataset_spec))


def paper_accuracy(row_label: str, dataset_spec: str, split: str = "test") -> Optional[Tuple[float, float]]:
    """The paper's Table 1 ``(mean, s.e.)`` for a row such as ``NoProp-CT (one-hot)``, or None."""
    name = paper_dataset(dataset_spec)
    if name is None:
        return None
    frame = paper_numbers()
    hit = frame[(frame["table"] == "table1") & (frame["row_label"] == row_label)
                & (frame["dataset"] == name) & (frame["split"] == split)]
    if hit.empty:
        return None
    return float(hit["mean"].iloc[0]), float(hit["se"].iloc[0])


def paper_memory_gb(method: str, dataset_spec: str) -> Optional[float]:
    """The paper's GPU memory (GB, one-hot embedding) for one of our methods (``noprop_dt``), or None."""
    name = paper_dataset(dataset_spec)
    method_label = paper_method_label(method)
    frame = paper_numbers()
    hit = frame[(frame["table"] == "memory_gb") & (frame["method"] == method_label) & (frame["dataset"] == name)]
    return None if hit.empty else float(hit["mean"].iloc[0])
