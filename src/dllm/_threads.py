"""The one place where BLAS and numexpr threads are set: one thread per MPI rank.

Tensor parallelism already puts one rank on each core; a multi-threaded BLAS inside every
rank would oversubscribe the cores and make timings meaningless. This module must be imported
before numpy (``dllm/__init__.py`` does so first). ``DLLM_THREADS`` overrides the count, for
a single rank that should use several cores.
"""
import os

THREADS = int(os.environ.get("DLLM_THREADS", "1") or 1)
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
             "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS",
             "NUMEXPR_MAX_THREADS"):
    os.environ[_var] = str(THREADS)

