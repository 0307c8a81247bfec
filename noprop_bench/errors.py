"""Errors that mean bad user input: the CLI prints them in one line and exits with status 2."""


class UsageError(ValueError):
    """A name, value or file given by the user that the harness cannot accept."""


EXIT_INTERRUPTED = 130  # what a shell reports for a command stopped by Ctrl-C (128 + SIGINT)
