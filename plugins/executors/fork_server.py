"""Imported first by the fork server that ``local[workers=N]`` forks its workers from (see
:data:`~noprop_bench_plugins.executors.local.FORK_SERVER_PRELOAD`): it makes that server ignore SIGTERM.

A SIGTERM to the whole process group (a scheduler's cancel, ``timeout``) reaches the server too; were it to
die, every worker would read as dead (exit code 255) while still training, and lose what it measured. The
server still ends once the host and its workers have (multiprocessing ends it then). Each process forked from
it starts with SIGTERM's default again, as a spawned one would. Imported anywhere else, by a child of the
server included, this module does nothing.
"""

import os
import signal
import sys
from multiprocessing import forkserver


def _imported_by_the_fork_server() -> bool:
    """Whether the import was made by the fork server's own preloading (the frames between are importlib's)."""
    frame = sys._getframe(2)  # 0: this function, 1: this module's code, then the import that runs it
    while frame is not None and frame.f_code.co_filename.startswith("<frozen importlib"):
        frame = frame.f_back
    return frame is not None and frame.f_code is forkserver.main.__code__


if _imported_by_the_fork_server():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.register_at_fork(after_in_child=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
