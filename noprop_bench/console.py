"""The ``noprop-bench`` entry point: the command line, with Ctrl-C while it still imports torch ending the
command as quietly as Ctrl-C anywhere later (the import takes a second or more, and a user may change their
mind in it)."""

import sys

from .errors import EXIT_INTERRUPTED


def main() -> None:
    """Import the command line and run it."""
    try:
        from .cli import main as command_line
    except KeyboardInterrupt:
        print("noprop-bench: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    command_line()
