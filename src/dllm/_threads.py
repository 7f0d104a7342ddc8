"""The one place where a rank's compute threads are set (BLAS, numexpr, numba).

One thread per rank by default: tensor parallelism already puts one rank on each core, and a
multi-threaded BLAS inside every rank would oversubscribe the cores and make timings
meaningless. One rank per machine with several threads (``--threads N``, ``DLLM_THREADS``,
``dllm.load(threads=N)``) is the other way to use a machine's cores, as Distributed Llama's
--nthreads: fewer ranks share each Allgather.

The pools are sized at run time by ``use`` (every dllm.load calls it), through threadpoolctl
for BLAS, so it works whichever module imported numpy first and leaves the user's own
OMP_NUM_THREADS & co. alone.
"""
import os

from .errors import DllmError

MAX_THREADS = 256


def _parse(value, what):
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise DllmError(f"{what} must be a whole number of threads, got {value!r}") from None
    if not 1 <= n <= MAX_THREADS:
        raise DllmError(f"{what} must be between 1 and {MAX_THREADS}, got {n}")
    return n


def from_env():
    """DLLM_THREADS, checked (1 when unset)."""
    return _parse(os.environ.get("DLLM_THREADS") or 1, "DLLM_THREADS")


# The user's own thread variables are left as they are; BLAS and numexpr are sized at run
# time (use), which works whether or not numpy was imported first.
os.environ.setdefault("NUMEXPR_MAX_THREADS", str(os.cpu_count() or 1))
# numba's threads: OpenMP first (its workqueue layer gave no speedup inside a model here), its
# workers told to sleep rather than spin after each parallel loop, as spinning takes the cores
# that OpenBLAS's threads need for the prefill gemm that follows.
os.environ.setdefault("NUMBA_THREADING_LAYER_PRIORITY", "omp tbb workqueue")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


_applied = None      # the thread count use() last gave the pools


def use(n=None):
    """Give this rank n compute threads (None: DLLM_THREADS or 1) in BLAS (threadpoolctl)
    and numexpr, at run time; returns n. numba's pool is sized by the fast backend, which is
    the only one that imports numba (dllm.backend.FastKernels)."""
    global _applied
    n = from_env() if n is None else _parse(n, "--threads")
    if n != _applied:
        import numexpr
        from threadpoolctl import threadpool_limits
        threadpool_limits(n, user_api="blas")
        numexpr.set_num_threads(n)
        _applied = n
    return n
