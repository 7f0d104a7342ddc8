"""What every entry point shares: the error contract and an argparse that only root prints.

Contract: a user mistake (DllmError) prints one line, "<prog>: error: <message>", on root and
every rank exits 1 (2 for a command line that does not parse), without a traceback. DllmError is raised collectively (see Comm.agree), so
no rank is left in a collective. Anything else is a bug: that rank prints its traceback and
aborts the whole job, so the other ranks do not hang. A rank that stops or dies is the
watchdog's (dllm.watchdog, started here on every rank of a multi-rank job): it names the lost
rank and aborts the job with exit code 75 (docs/faults.md).
"""
import argparse
import sys
import time
import traceback

from .backend import KERNELS
from .checks import check_values, finite_float
from .errors import DllmError, LoneError, UsageError, exit_status
from .output import FLUSH_SECONDS, end_output
from .shard import SCHEMES

MPI_HELP = ("install an MPI library: pip install 'dllm[mpich]' (PyPI MPICH), or your system's "
            "MPI (apt install mpich libmpich-dev, then pip install --no-binary mpi4py mpi4py)")


class ArgumentParser(argparse.ArgumentParser):
    """Raises DllmError instead of exiting, and prints help only on root."""

    def __init__(self, *args, is_root=True, **kwargs):
        super().__init__(*args, **kwargs)
        self.is_root = is_root
        from . import __version__
        self.add_argument("--version", action="version", version=f"dllm {__version__}")

    def add_argument(self, *args, **kwargs):
        # Every float flag of every command is finite: "--timeout nan" must not pass as a
        # number and silently switch a limit off.
        if kwargs.get("type") is float:
            kwargs["type"] = finite_float
        return super().add_argument(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):
        """Parse, then hold every value to the ranges of dllm.checks (one rule per flag
        name, for every command)."""
        parsed = super().parse_args(args, namespace)
        check_values(parsed)
        return parsed

    def error(self, message):
        raise UsageError(f"{message} (see --help)")

    def _print_message(self, message, file=None):
        if self.is_root:
            super()._print_message(message, file)


def add_engine_options(p):
    """The flags that say how a model is loaded and run over the ranks (dllm.load's options):
    generate and eval share them, so they mean the same everywhere."""
    p.add_argument("--model", default=None,
                   help="dllm HDF5 model file (default: the embedded tinystories-1m demo)")
    p.add_argument("--sync", default="q80", choices=("q80", "f32"),
                   help="activation payload between ranks (default q80)")
    p.add_argument("--sync-scheme", default="slices", choices=SCHEMES,
                   help="how ranks combine matmul outputs: Allgather output slices (default), "
                        "Allgather row-parallel partial sums, reduce-scatter + Allgather, or "
                        "'star': every exchange through root, which alone attends and holds "
                        "the KV cache and classifier (the paper's Distributed Llama 0.1)")
    p.add_argument("--parallel", default="tensor", choices=("tensor", "pipeline"),
                   help="'tensor': every rank a slice of every matrix (default); 'pipeline': "
                        "every rank whole layers, activations passed rank to rank")
    p.add_argument("--profile", default=None, metavar="PATH",
                   help="device profile (JSON, docs/parallelism.md): layers by speed within "
                        "memory (pipeline), uneven slices by speed (tensor)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="context to allocate, at most the model's (default: the model's)")
    p.add_argument("--weights-from", default="file", choices=("file", "root"),
                   help="'file': every rank reads its slices from the model file (shared "
                        "filesystem); 'root': root reads and sends them (default file)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer file overriding the embedded one (SentencePiece "
                        "tokenizer.model, llama2.c tokenizer.bin or tokenizer.json)")
    p.add_argument("--prefill-chunk", type=int, default=64,
                   help="prompt tokens per forward pass while prefilling (default 64)")
    add_kernel_options(p)


def add_kernel_options(p):
    """--kernels and --threads (dllm.load's kernels= and threads=): every command that runs a
    model has them, bench and plan too."""
    p.add_argument("--kernels", default=None, choices=KERNELS,
                   help="compute kernels: 'fast' (numba, pip install 'dllm[fast]') or "
                        "'numpy' (the reference); default DLLM_KERNELS, else fast when "
                        "numba is installed")
    add_thread_option(p)


def add_thread_option(p):
    """--threads alone, for commands that compute with numpy only (dllm.train)."""
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="compute threads per rank (default DLLM_THREADS, else 1): one rank "
                        "per machine with N threads, as Distributed Llama's --nthreads")


def load_model(comm, args):
    """dllm.load with the engine options (collective); the embedded demo without --model."""
    from . import demo_model
    from .loading import load
    return load(args.model or demo_model(), comm, sync=args.sync,
                max_seq_len=args.max_seq_len, weights_from=args.weights_from,
                tokenizer=args.tokenizer, prefill_chunk=args.prefill_chunk,
                sync_scheme=args.sync_scheme, parallel=args.parallel, profile=args.profile,
                kernels=args.kernels, threads=args.threads)


def add_fault_options(parser):
    """--timeout and --load-timeout: how long any rank may wait in one MPI call."""
    from .watchdog import DEFAULT_LOAD_TIMEOUT, DEFAULT_TIMEOUT
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help="abort the job, naming the ranks that did not arrive, when a "
                             "rank waits longer than this in one MPI call once the model is "
                             f"loaded (default {DEFAULT_TIMEOUT:.0f}; 0 = never)")
    parser.add_argument("--load-timeout", type=float, default=DEFAULT_LOAD_TIMEOUT,
                        metavar="SECONDS",
                        help="the same limit while the model loads and the first token is "
                             f"computed (default {DEFAULT_LOAD_TIMEOUT:.0f}; 0 = never)")


def use_fault_options(comm, args, hint=None):
    """Give this rank's watchdog the parsed limits (checked when parsed: finite, >= 0),
    and the hint that ends its report."""
    if comm.watchdog is not None:
        comm.watchdog.timeout = args.timeout or None
        comm.watchdog.load_timeout = args.load_timeout or None
        comm.watchdog.hint = hint


def model_loaded(comm):
    """From now on waits are held to --timeout (the watchdog's run-time limit)."""
    if comm.watchdog is not None:
        comm.watchdog.loaded()


def run(main, argv, prog):
    """Run main(comm, argv) on every rank under the error contract; returns the exit code."""
    try:
        from .comm import Comm
        comm = Comm()
    except (ImportError, RuntimeError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"{prog}: error: MPI is not available ({reason}); {MPI_HELP}", file=sys.stderr)
        return 1
    comm.watchdog = None
    if comm.size > 1 and comm.threads_supported():
        from .watchdog import Watchdog
        comm.watchdog = Watchdog(comm, prog).start()
    elif comm.size > 1 and comm.is_root:
        print(f"{prog}: warning: this MPI library does not provide MPI_THREAD_MULTIPLE, so "
              f"the watchdog is off: a lost rank may leave the job hanging", file=sys.stderr)
    try:
        return main(comm, argv) or 0
    except DllmError as exc:
        alone = isinstance(exc, LoneError)
        if comm.is_root or alone:
            print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
        if alone and comm.size > 1:
            abort_job(comm, 1)
        return exit_status(exc)
    except KeyboardInterrupt:
        if comm.is_root:
            print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        abort_job(comm, 130)
    except BrokenPipeError:  # output piped into `head`: not an error of ours
        return 0
    except Exception:
        traceback.print_exc()
        print(f"{prog}: rank {comm.rank} failed unexpectedly (a bug in dllm); aborting all "
              f"ranks", file=sys.stderr, flush=True)
        abort_job(comm, 1)
    finally:
        if comm.watchdog is not None:
            comm.watchdog.stop()
    return 1


def abort_job(comm, code):
    """End every rank now, after the lines printed so far have had time to arrive."""
    end_output()
    if comm.size > 1:
        # The launcher forwards stderr asynchronously and an abort tears the job down at
        # once: without a moment's grace the error line was lost (the example).
        time.sleep(FLUSH_SECONDS)
    comm.abort(code)


def entry(main, prog):
    """For `if __name__ == "__main__"`: run and exit with its code."""
    sys.exit(run(main, None, prog))
