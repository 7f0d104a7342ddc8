"""The one compiled C part of dllm: the Q4_0 x Q8_0 GEMM of the fast kernels (T > 1 rows).

optional=True: where no C compiler is at hand the install still succeeds, and
dllm.kernels_fast multiplies T > 1 rows with its numba kernel instead (same results, slower;
the run's conditions say which ran). Everything else is in setup.cfg.
"""
from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "dllm._gemm_q40_q80", ["src/dllm/_gemm_q40_q80.c"],
    # -ffp-contract=off: no fused multiply-add, so that each row equals the decode kernel's
    extra_compile_args=["-O3", "-ffp-contract=off", "-std=c99"], optional=True)])
