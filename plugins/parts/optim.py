"""Optimiser options the built-in methods share."""

from typing import Any, Dict

import torch


def optimizer_options(device) -> Dict[str, Any]:
    """Keyword arguments for ``torch.optim.Adam``/``AdamW``: the fused CUDA kernels (one launch for all
    parameters instead of several per tensor) on CUDA; torch's default elsewhere, so CPU results stay as
    they were."""
    return {"fused": True} if torch.device(device).type == "cuda" else {}
