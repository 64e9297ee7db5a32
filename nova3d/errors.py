"""The error type for bad input: the CLI prints its message as one line and exits non-zero."""


class Nova3DError(Exception):
    """A problem with what the user gave us (a file, a config, an argument), not a bug."""
