"""Interrupts in the host process: what stopped a run (Ctrl-C or a SIGTERM passed on as one), and holding
an interrupt back while something must be written or read whole."""

import contextlib
import signal
import threading
from typing import ContextManager, Iterator

_stopped_by_sigterm = threading.Event()


def note_sigterm() -> None:
    """Record that the run is being stopped by a SIGTERM (a scheduler or CI system cancelling it)."""
    _stopped_by_sigterm.set()


def forget_sigterm() -> None:
    _stopped_by_sigterm.clear()


def stop_cause() -> str:
    """The error text of a trial stopped by an interrupt: what sent it, as far as the host knows."""
    if _stopped_by_sigterm.is_set():
        return "stopped by SIGTERM (the job was cancelled)"
    return "interrupted by the user (Ctrl-C)"


@contextlib.contextmanager
def signal_held(signum: int) -> Iterator[None]:
    """Hold the signal ``signum`` back until the block ends, then hand it to the handler it had.

    For what must not stop halfway: a message to or from a worker (a pipe left mid-message blocks the
    next read for good) and a record appended to ``trials.jsonl`` (a torn line loses the trial). Only a
    signal handled in Python (by ``KeyboardInterrupt`` or a handler of this program) is held: one that is
    ignored or left to the system keeps its usual effect (for SIGINT see ``cli.sigterm_as_ctrl_c``).
    Outside the main thread, where no handler can be set, this does nothing."""
    previous = signal.getsignal(signum)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield
        return
    held = []
    signal.signal(signum, lambda number, frame: held.append(number))
    try:
        yield
    finally:
        signal.signal(signum, previous)
        if held:
            previous(signum, None)


def ctrl_c_held() -> ContextManager[None]:
    """Hold Ctrl-C (and a SIGTERM passed on as one) back until the block ends, then raise it."""
    return signal_held(signal.SIGINT)
