"""What every entry point shares: the error contract and an argparse that only root prints.

Contract: a user mistake (DllmError) prints one line, "<prog>: error: <message>", on root and
every rank exits 1, without a traceback. DllmError is raised collectively (see Comm.agree), so
no rank is left in a collective. Anything else is a bug: that rank prints its traceback and
aborts the whole job, so the other ranks do not hang.
"""
import argparse
import sys
import traceback

from .errors import DllmError

MPI_HELP = ("install an MPI library: pip install 'dllm[mpich]' (PyPI MPICH), or your system's "
            "MPI (apt install mpich libmpich-dev, then pip install --no-binary mpi4py mpi4py)")


class ArgumentParser(argparse.ArgumentParser):
    """Raises DllmError instead of exiting, and prints help only on root."""

    def __init__(self, *args, is_root=True, **kwargs):
        super().__init__(*args, **kwargs)
        self.is_root = is_root

    def error(self, message):
        raise DllmError(f"{message} (see --help)")

    def _print_message(self, message, file=None):
        if self.is_root:
            super()._print_message(message, file)


def root_print(comm, *args, **kwargs):
    """Print on root only (all user-facing output goes through here)."""
    if comm.is_root:
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def run(main, argv, prog):
    """Run main(comm, argv) on every rank under the error contract; returns the exit code."""
    try:
        from .comm import Comm
        comm = Comm()
    except (ImportError, RuntimeError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"{prog}: error: MPI is not available ({reason}); {MPI_HELP}", file=sys.stderr)
        return 1
    try:
        return main(comm, argv) or 0
    except DllmError as exc:
        if comm.is_root:
            print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        if comm.is_root:
            print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        comm.abort(130)
    except BrokenPipeError:  # output piped into `head`: not an error of ours
        return 0
    except Exception:
        traceback.print_exc()
        print(f"{prog}: rank {comm.rank} failed unexpectedly (a bug in dllm); aborting all "
              f"ranks", file=sys.stderr, flush=True)
        comm.abort(1)
    return 1


def entry(main, prog):
    """For `if __name__ == "__main__"`: run and exit with its code."""
    sys.exit(run(main, None, prog))
