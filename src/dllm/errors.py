"""User-facing errors.

A ``DllmError`` is a user mistake or bad input (a missing file, a bad flag, a model that
cannot be split). The command-line entry points print its message as one line on root and
exit non-zero on every rank, without a traceback. Code that may fail on some ranks only
(opening a file on each host) must go through ``Comm.agree`` so that every rank raises the
same error together and none is left waiting in a collective.
"""


class DllmError(Exception):
    """A clear, one-line problem with the user's input; never a bug in dllm."""


class UsageError(DllmError):
    """A command line that does not parse (an unknown flag, a missing argument): exit
    status 2, as argparse's convention says, where other DllmErrors exit 1."""

    exit_status = 2


def exit_status(exc):
    """The exit status of an entry point that stops on DllmError exc."""
    return getattr(exc, "exit_status", 1)


class ModelFileError(DllmError):
    """The model file is missing, truncated, corrupt or of an unknown format version."""


class LoneError(DllmError):
    """A DllmError on one rank at a moment the others cannot be told of it (root failing to
    write a transcript or checkpoint while they compute): the entry point prints it there and
    aborts the job with exit code 1, instead of leaving the others waiting in a collective."""


def on_one_rank(fn, *args, **kwargs):
    """fn(*args, **kwargs), its DllmError raised as a LoneError."""
    try:
        return fn(*args, **kwargs)
    except DllmError as exc:
        raise LoneError(str(exc)) from None
