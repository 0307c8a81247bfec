"""The ``--help`` layout of the command-line parsers, and the argument types they share."""

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Argparse's defaults in the help, except where the default is None: such an option is decided later
    (by the device, a preset or the dataset), and its help says how; "(default: None)" would mislead."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def non_empty(text: str) -> str:
    """An argparse ``type`` for paths and names: an empty string (an unset shell variable, say) is refused
    rather than quietly taken for the default."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty (an unset shell variable?): give a value, or leave the "
                                         "option out")
    return text
