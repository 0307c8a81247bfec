"""A background tick for progress lines that must come even while one long call (a batch) runs."""

import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, TypeVar

T = TypeVar("T")

TICK_SECONDS = 1.0


@contextmanager
def ticking(tick: Callable[[], None], every: Optional[float] = None) -> Iterator[None]:
    """Call ``tick`` every ``every`` seconds (default :data:`TICK_SECONDS`) from a daemon thread while the
    block runs. ``tick`` must be cheap, read no device value, and be safe beside the main thread; an error
    it raises ends the ticking, not the block."""
    stop = threading.Event()
    interval = TICK_SECONDS if every is None else every

    def loop() -> None:
        while not stop.wait(interval):
            try:
                tick()
            except Exception:  # noqa: BLE001 - a progress line must never cost the run
                return

    thread = threading.Thread(target=loop, name="noprop-bench progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def one_at_a_time(say: Callable[[str], T]) -> Callable[[str], T]:
    """``say`` behind a lock, for a ``say`` that a tick and the main thread share: a worker's ``say`` sends on a
    pipe, and two threads sending at once could interleave their bytes."""
    lock = threading.RLock()

    def said(message: str) -> T:
        with lock:
            return say(message)
    return said
