"""Interrupts in the host process: what stopped a run (Ctrl-C or a SIGTERM passed on as one), and holding
an interrupt back while something must be written or read whole."""

import contextlib
import signal
import threading
from typing import Iterator

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
def ctrl_c_held() -> Iterator[None]:
    """Hold Ctrl-C (and a SIGTERM passed on as one) back until the block ends, then raise it.

    For what must not stop halfway: a message to or from a worker (a pipe left mid-message blocks the
    next read for good) and a record appended to ``trials.jsonl`` (a torn line loses the trial). Outside
    the main thread, where no handler can be set, and where SIGINT is ignored (a SIGTERM must then keep
    its usual effect, see ``cli.sigterm_as_ctrl_c``), this does nothing."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, None)):
        yield
        return
    held = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held and previous is signal.default_int_handler:
            raise KeyboardInterrupt
        if held and callable(previous):
            previous(signal.SIGINT, None)
