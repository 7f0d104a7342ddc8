"""The one compiled C part of dllm: the Q4_0 x Q8_0 product of the fast kernels.

optional=True: where no C compiler is at hand the install still succeeds, and
dllm.kernels_fast multiplies with its numba kernels instead (decode: the same bits, a little
slower; prefill: float32 inputs times dequantized tiles); the run's conditions say which ran
(`gemm`). Everything else is in setup.cfg.
"""
from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "dllm._gemm_q40_q80", ["src/dllm/_gemm_q40_q80.c"],
    # -ffp-contract=off: no fused multiply-add, so that each row equals numba's decode kernel's
    extra_compile_args=["-O3", "-ffp-contract=off", "-std=c99"], optional=True)])
