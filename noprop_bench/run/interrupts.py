"""Interrupts: what stopped a run (Ctrl-C or a SIGTERM passed on as one), holding an interrupt back while
something must be written or read whole, and the stop signal with which a host asks a worker process to
stop the trial it trains (the trial then records what it measured)."""

import contextlib
import signal
import threading
from typing import ContextManager, Iterator

CTRL_C_CAUSE = "interrupted by the user (Ctrl-C)"
SIGTERM_CAUSE = "stopped by SIGTERM"
TIME_LIMIT_CAUSE = "stopped at its job's time limit"

_stopped_by_sigterm = threading.Event()
_at_time_limit = threading.Event()  # a job process whose scheduler said its time is up
# how a host asks a worker process to stop its trial (POSIX only: elsewhere a worker is only ever killed)
STOP_SIGNAL = getattr(signal, "SIGUSR1", None)
_training = threading.Event()  # a trial is training or evaluating in this process: a stop interrupts it
_stop_pending = threading.Event()  # a stop came before the trial began: it is taken when the trial begins


def note_sigterm() -> None:
    """Record that the run is being stopped by a SIGTERM (a scheduler or CI system cancelling it)."""
    _stopped_by_sigterm.set()


def forget_sigterm() -> None:
    _stopped_by_sigterm.clear()


def sigterm_noted() -> bool:
    """Whether this process is being stopped by a SIGTERM (see :func:`note_sigterm`)."""
    return _stopped_by_sigterm.is_set()


def note_time_limit() -> None:
    """Record that this job process is being stopped because its time limit is near."""
    _at_time_limit.set()


def stop_cause() -> str:
    """The error text of a trial stopped by an interrupt: what sent it, as far as this process knows."""
    if _at_time_limit.is_set():
        return TIME_LIMIT_CAUSE
    if _stopped_by_sigterm.is_set():
        return SIGTERM_CAUSE
    return CTRL_C_CAUSE


@contextlib.contextmanager
def signal_held(signum: int) -> Iterator[None]:
    """Hold the signal ``signum`` back until the block ends, then hand it to the handler it had.

    For what must not stop halfway: a message to or from a worker (a pipe left mid-message blocks the
    next read for good) and a record appended to ``trials.jsonl`` (a torn line loses the trial). Only a
    signal handled in Python (by ``KeyboardInterrupt`` or a handler of this program) is held: one that is
    ignored or left to the system keeps its usual effect (see ``ctrl_c_held`` for an ignored SIGINT).
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
    """Hold Ctrl-C (and a SIGTERM passed on as one) back until the block ends, then raise it. Where SIGINT
    is ignored, a run takes a SIGTERM as Ctrl-C without passing it on (``cli.sigterm_as_ctrl_c``), so the
    SIGTERM is what is held."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        return signal_held(signal.SIGTERM)
    return signal_held(signal.SIGINT)


def stop_trial(signum, frame) -> None:
    """The worker's handler of :data:`STOP_SIGNAL`: interrupt the trial (it is recorded as interrupted, with
    what it measured); one that has not begun is interrupted as it begins; between trials it does nothing
    more than that, so a finished trial's record is never lost to it."""
    if _training.is_set():
        raise KeyboardInterrupt
    _stop_pending.set()


def forget_pending_stop() -> None:
    """Drop a stop that came after this process's trial had ended (its next trial is not to be stopped)."""
    _stop_pending.clear()


def stop_trial_on(*signums: int) -> None:
    """Let each of ``signums`` stop the trial this process trains, as :func:`stop_trial` does, instead of
    killing the process halfway through a record (a SIGTERM is noted as the cause). For worker and job
    processes; call it from the main thread."""
    for signum in signums:
        signal.signal(signum, _stop_noting_the_cause)


def _stop_noting_the_cause(signum, frame) -> None:
    if signum == signal.SIGTERM:
        note_sigterm()
    stop_trial(signum, frame)


@contextlib.contextmanager
def stoppable() -> Iterator[None]:
    """The block a worker's stop signal interrupts (a trial's training and evaluation)."""
    if _stop_pending.is_set():
        _stop_pending.clear()
        raise KeyboardInterrupt
    _training.set()
    try:
        yield
    finally:
        _training.clear()
