"""The ``--help`` layout of the command-line parsers."""

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Argparse's defaults in the help, except where the default is None: such an option is decided later
    (by the device, a preset or the dataset), and its help says how; "(default: None)" would mislead."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)
