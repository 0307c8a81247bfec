"""The ``noprop-bench`` entry point: the command line, with Ctrl-C while it still imports torch ending the
command as quietly as Ctrl-C anywhere later (the import takes a second or more, and a user may change their
mind in it), and output piped into a reader that stops early (``| head``) ending it without a traceback."""

import os
import sys

from .errors import EXIT_INTERRUPTED


def main() -> None:
    """Import the command line and run it."""
    try:
        from .cli import main as command_line
    except KeyboardInterrupt:
        print("noprop-bench: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    try:
        try:
            command_line()
        finally:  # before the exit: buffered output left for the interpreter's shutdown would fail there
            sys.stdout.flush()
    except BrokenPipeError:
        # the reader left: what is still buffered for it goes nowhere, rather than failing again at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_BROKEN_PIPE)


EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a command ended by SIGPIPE
