"""The one error type a user sees.

A `RetrainError` carries a single line that names the file, key or URL at fault and what to do
about it. Stage scripts and the command line catch it at the top and print just that line (exit
status 1); anything else is a bug and keeps its traceback.
"""


class RetrainError(Exception):
    """A user-facing problem: one line, naming what is wrong and what to do."""


def exit_on_error(function):
    """Run a stage or command; a RetrainError becomes its one line on stderr and exit status 1."""
    import sys

    try:
        return function()
    except RetrainError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: finished work is kept; rerun to go on", file=sys.stderr)
        sys.exit(130)
