"""User-facing errors.

A ``DllmError`` is a user mistake or bad input (a missing file, a bad flag, a model that
cannot be split). The command-line entry points print its message as one line on root and
exit non-zero on every rank, without a traceback. Code that may fail on some ranks only
(opening a file on each host) must go through ``Comm.agree`` so that every rank raises the
same error together and none is left waiting in a collective.
"""


class DllmError(Exception):
    """A clear, one-line problem with the user's input; never a bug in dllm."""


class ModelFileError(DllmError):
    """The model file is missing, truncated, corrupt or of an unknown format version."""
