"""Which compute kernels a model runs: the one place that chooses.

- "numpy": dllm.kernels, numpy/numexpr. The reference, the fallback, and what runs where the
  optional extra is absent; x (T, n) float32 times the Q4_0 matrix dequantized in tiles.
- "fast": dllm.kernels_fast, compiled by numba (``pip install 'dllm[fast]'``) and a C
  extension with AVX2 (dllm._gemm_q40_q80, built by setup.py) that multiplies every Q4_0
  product where it runs. Q4_0 x Q8_0 in integer arithmetic as GGML does it, for decoding and
  (where the C kernel runs) for prefill and batched rows; dequantized tiles times BLAS for
  prefill elsewhere; weights repacked at load time for SIMD, rows split over --threads.

The choice: the ``kernels`` argument of dllm.load (``--kernels`` on every CLI), else the
DLLM_KERNELS environment variable, else "fast" when numba can be imported, else "numpy".
The run's conditions record which ran (dllm.stats.conditions).
"""
import os

import numpy as np

from . import _threads, kernels
from .errors import DllmError
from .quant import dequantize_q80, quantize_q80
from .weight_types import Matrix, weight_type

KERNELS = ("numpy", "fast")
FAST_HELP = "pip install 'dllm[fast]' (numba)"


def fast_available():
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def choose(name=None):
    """The kernel backend's name: `name`, DLLM_KERNELS, or the best one importable."""
    name = name or os.environ.get("DLLM_KERNELS") or None
    if name is None:
        return "fast" if fast_available() else "numpy"
    if name not in KERNELS:
        raise DllmError(f"--kernels must be one of {', '.join(KERNELS)}, got {name!r}")
    if name == "fast" and not fast_available():
        raise DllmError(f"--kernels fast needs numba, which is not installed: {FAST_HELP}")
    return name


class NumpyKernels:
    """The reference backend: weights stay as stored (weight_types.Matrix), inputs float32;
    every type multiplies by its table entry's numpy kernel."""
    name = "numpy"
    gemm = "numpy"       # what multiplies T > 1 rows (the fast backend: "avx2" or "blas")

    def __init__(self, threads=1):
        self.threads = threads

    def prepare(self, w, wtype):
        """A stored matrix of type `wtype` (a weight_types name) as this backend multiplies it."""
        return Matrix(w, weight_type(wtype))

    def stored(self, w):
        """The stored array a weight this rank keeps was made from (norms: themselves)."""
        return w.data if isinstance(w, Matrix) else w

    def quantize_input(self, x):
        """x (T, n) float32, as every matmul of this backend takes it."""
        return x

    def quantize_q80(self, x):
        """float32 (T, n) -> Q8_0 bytes (T, n/32*34): the Q80 sync payload (quant.py)."""
        return quantize_q80(x)

    def dequantize_q80(self, payload, out=None):
        """Q8_0 bytes (T, nb*34) -> float32 (T, nb*32) (quant.py); into `out` if given."""
        return dequantize_q80(payload, out)

    def input_from_q80(self, payload):
        """Q8_0 bytes (T, nb*34) -> quantize_input of their float32 values."""
        return dequantize_q80(payload)

    def rmsnorm(self, x, weight, eps):
        """The float32 steps between the matmuls: dllm.kernels' rmsnorm, rope, swiglu."""
        return kernels.rmsnorm(x, weight, eps)

    def rope(self, x, cos, sin):
        return kernels.rope(x, cos, sin)

    def swiglu(self, gate, up):
        return kernels.swiglu(gate, up)

    def attention(self, q, k_cache, v_cache, pos, head_kv):
        """Causal attention of T query rows (kernels.attention: one batched product)."""
        return kernels.attention(q, k_cache, v_cache, pos, head_kv)

    def matmul(self, x, w):
        """quantize_input(x) (T, n) times a prepared weight (rows, n), transposed."""
        return w.wtype.matmul(x, w.data)

    def quantize_rows(self, x):
        """x (K, n): K independent one-row inputs (K decoding sequences), for matmul_rows."""
        return x

    def matmul_rows(self, x, w):
        """Each row of quantize_rows(x) times W as matmul does a T = 1 input -> (K, rows)."""
        return np.concatenate([self.matmul(x[i:i + 1], w) for i in range(len(x))])


class FastKernels:
    """Compiled kernels: Q4_0 weights repacked (kernels_fast.Q40Packed) and multiplied by
    Q8_0 inputs (T > 1 rows too where kernels_fast.gemm_isa() names the C kernel); Q8_0
    weights multiplied by Q8_0 inputs as stored when decoding; every other type (and Q8_0
    prefill) by its numpy kernel; matrix rows split over `threads` threads."""
    name = "fast"

    def __init__(self, threads=1):
        from . import kernels_fast
        self.fast, self.threads = kernels_fast, threads
        self.gemm = kernels_fast.gemm_isa() or "blas"     # what multiplies T > 1 rows
        kernels_fast.set_threads(threads)
        kernels_fast.warm_up(threads)

    def prepare(self, w, wtype):
        if wtype == "q40":
            packed = self.fast.pack_q40(w)
            self.fast.prefer_huge_pages(packed.codes)     # streamed once per token
            return packed
        return Matrix(w, weight_type(wtype))

    def stored(self, w):
        if isinstance(w, self.fast.Q40Packed):
            return self.fast.unpack_q40(w)
        return w.data if isinstance(w, Matrix) else w

    def quantize_input(self, x):
        """x (T, n) float32 -> Q8_0 once for every matmul of it (T > 1: where the C kernel
        runs; elsewhere float32 for the dequantized tiles)."""
        return self.fast.quantize_input(x)

    def matmul(self, x, w):
        return self.fast.matmul(x, w, self.threads)

    def quantize_q80(self, x):
        """quant.quantize_q80's bytes, compiled (kernels_fast.quantize_q80)."""
        return self.fast.quantize_q80(x)

    def dequantize_q80(self, payload, out=None):
        """quant.dequantize_q80's values, compiled."""
        return self.fast.dequantize_q80(payload, out)

    def input_from_q80(self, payload):
        """Q8_0 bytes (T, nb*34) -> quantize_input of their values, from the bytes
        (kernels_fast.input_from_q80: no float32 round trip)."""
        return self.fast.input_from_q80(payload)

    def rmsnorm(self, x, weight, eps):
        """Compiled twins of dllm.kernels' rmsnorm, rope, swiglu (kernels_fast)."""
        return self.fast.rmsnorm(x, weight, eps)

    def rope(self, x, cos, sin):
        return self.fast.rope(x, cos, sin)

    def swiglu(self, gate, up):
        return self.fast.swiglu(gate, up)

    def attention(self, q, k_cache, v_cache, pos, head_kv):
        """Causal attention, compiled, each query row over its own keys as if alone (with
        the integer matmuls, a row's numbers then never depend on the rows beside it)."""
        return self.fast.attention(q, k_cache, v_cache, pos, head_kv)

    def quantize_rows(self, x):
        """x (K, n) -> every row as Q8_0 (as quantize_input does one row), for matmul_rows."""
        return self.fast.Q80Input(x) if x.shape[1] % 32 == 0 else x

    def matmul_rows(self, x, w):
        """Q80Input of K rows times W: each row's arithmetic is the T = 1 decode kernel's,
        with the weights read once for all K rows (kernels_fast.matmul_rows)."""
        return self.fast.matmul_rows(x, w, self.threads)


def make(name=None, threads=None):
    """The kernels object of backend `name` (see choose) with `threads` compute threads for
    this rank (None: DLLM_THREADS or 1; set process-wide by dllm._threads.use). Raises
    DllmError for an unknown or unavailable backend or a bad thread count."""
    threads = _threads.use(threads)
    return FastKernels(threads) if choose(name) == "fast" else NumpyKernels(threads)
