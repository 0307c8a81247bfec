"""Imported first by the fork server that ``local[workers=N]`` forks its workers from (see
:data:`~noprop_bench_plugins.executors.local.FORK_SERVER_PRELOAD`): it makes that server ignore SIGTERM.

A SIGTERM to the whole process group (a scheduler's cancel, ``timeout``) reaches the server too; were it to
die, every worker would read as dead (exit code 255) while still training, and lose what it measured. The
server still ends with the host, as multiprocessing ends it. Imported anywhere else, this module does nothing.
"""

import signal
import sys
from multiprocessing import forkserver


def _imported_by_the_fork_server() -> bool:
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code is forkserver.main.__code__:
            return True
        frame = frame.f_back
    return False


if _imported_by_the_fork_server():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
