"""Finding host synchronisations that a method's own code forces, on any device.

On CUDA, torch's sync debug mode sees every synchronisation. On the CPU nothing synchronises, so the
check looks for the calls that would: ``Tensor.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``,
conversions to ``bool``/``float``/``int``, and ``torch.tensor(data, device=...)`` (a copy from host memory,
which on CUDA waits for the stream), counted only when made by the plugin's own code (torch's
optimisers read their CPU step counters this way, and solver libraries test tolerances: neither is the
plugin's doing, and on CUDA the sync debug mode sees whatever of it really synchronises).
"""

import contextlib
import sys
import warnings
from typing import Collection, Iterator, List

import torch

SYNCING_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


class HostSyncWarning(UserWarning):
    """A method forced the host to wait for the device inside ``train_step``."""


@contextlib.contextmanager
def record_host_syncs(device: torch.device, packages: Collection[str]) -> Iterator[List[str]]:
    """Within the block, collect a description of each host synchronisation forced by code of ``packages``
    (top-level package names)."""
    found: List[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in SYNCING_METHODS}
    original_tensor = torch.tensor

    def note(what):
        frame = sys._getframe(2)
        if frame.f_globals.get("__name__", "").partition(".")[0] in packages:
            found.append(f"{what} at {frame.f_code.co_filename}:{frame.f_lineno}")

    def counting(name, original):
        def call(self, *args, **kwargs):
            note(f"Tensor.{name}()")
            return original(self, *args, **kwargs)
        return call

    def tensor_from_host(*args, **kwargs):
        if kwargs.get("device") is not None:
            note("torch.tensor(..., device=...)")
        return original_tensor(*args, **kwargs)

    cuda = torch.device(device).type == "cuda"
    previous_mode = torch.cuda.get_sync_debug_mode() if cuda else None
    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, counting(name, original))
        torch.tensor = tensor_from_host
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield found
        for caught_warning in caught:
            if cuda and "synchroniz" in str(caught_warning.message).lower():
                found.append(f"CUDA synchronisation: {caught_warning.message}")
            else:  # not ours to swallow
                warnings.warn_explicit(caught_warning.message, caught_warning.category, caught_warning.filename,
                                       caught_warning.lineno)
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        torch.tensor = original_tensor
        if cuda:
            torch.cuda.set_sync_debug_mode(previous_mode)
