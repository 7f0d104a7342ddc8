"""The weight-type table: every type a weight matrix can be stored and multiplied in.

Each entry states once what the rest of dllm asks of a type: how a row is stored (values per
block, bytes per block, the dtype of the stored array, in the model file and in memory), how
float32 values become that (GGML bit-exact for Q4_0 and Q8_0, dllm.quant) and back, how NaN
and infinity show in it, and which matmul kernels multiply it (the numpy kernel here; the fast
backend's layout, if it has one, in dllm.backend). The type of every tensor is read from the
model file (its ``quant`` attribute), never guessed from its dtype: Q4_0 and Q8_0 are both
uint8.

| type | block | bytes/block | stored dtype, shape          | bytes/weight | GGML  |
|------|-------|-------------|------------------------------|--------------|-------|
| q40  | 32    | 18          | uint8   (rows, cols/32*18)   | 0.5625       | Q4_0  |
| q80  | 32    | 34          | uint8   (rows, cols/32*34)   | 1.0625       | Q8_0  |
| f16  | 1     | 2           | float16 (rows, cols)         | 2            | F16   |
| bf16 | 1     | 2           | uint16  (rows, cols), bits   | 2            | BF16  |
| f32  | 1     | 4           | float32 (rows, cols)         | 4            | F32   |

bf16 is stored as its bit pattern (HDF5 has no bfloat16): the upper 16 bits of the float32,
rounded to nearest even (NaN kept quiet), as GGML's ggml_compute_fp32_to_bf16; widening back
is exact. Norm vectors are always f32. Adding a type is one entry here plus its kernels.
"""
import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

from . import kernels
from .quant import (Q40_BLOCK_BYTES, Q80_BLOCK_BYTES, dequantize_q40, dequantize_q80,
                    quantize_q40, quantize_q80)


def quantize_bf16(x):
    """float32 (..., n) -> bf16 bits uint16 (..., n): round to nearest even; NaN stays a
    quiet NaN (GGML's ggml_compute_fp32_to_bf16)."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))) >> 16
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.where(nan, (bits >> 16) | np.uint32(64), rounded).astype(np.uint16)


def dequantize_bf16(b):
    """bf16 bits uint16 (..., n) -> float32 (..., n), exact."""
    return (np.asarray(b, np.uint16).astype(np.uint32) << 16).view(np.float32)


def quantize_f16(x):
    """float32 -> float16, round to nearest even (beyond the range: +-inf, as GGML)."""
    with np.errstate(over="ignore"):
        return np.asarray(x, np.float32).astype(np.float16)


def _as_f32(x):
    return np.asarray(x, np.float32)


def _block_scales(b, block_bytes):
    """The f16 scales that start every block of a Q4_0 / Q8_0 array, as float16."""
    blocks = np.ascontiguousarray(b).reshape(-1, block_bytes)
    return blocks[:, :2].copy().view(np.float16)


def _bf16_nonfinite(b):
    return int(np.count_nonzero((np.asarray(b, np.uint16) & 0x7F80) == 0x7F80))


def _float_nonfinite(b):
    return int(b.size - np.count_nonzero(np.isfinite(b)))


@dataclass(frozen=True)
class WeightType:
    """One weight type. quantize: float32 (..., n) -> stored (..., stored_cols(n));
    dequantize: stored -> float32 (..., n). nonfinite(stored): how many NaN or infinite
    values (of block types: block scales) it holds. matmul(x, stored): the numpy kernel,
    x (T, n) float32 times the stored matrix (rows, ...) transposed -> (T, rows) float32."""
    name: str
    ggml: str
    block: int
    block_bytes: int
    dtype: np.dtype
    quantize: object
    dequantize: object
    nonfinite: object
    matmul: object

    @property
    def bytes_per_weight(self):
        return self.block_bytes / self.block

    def stored_cols(self, cols):
        """Entries of the stored dtype in a row of `cols` values."""
        return cols // self.block * self.block_bytes // self.dtype.itemsize

    def stored_shape(self, shape):
        """Shape of a (rows, cols) matrix as stored."""
        return (shape[0], self.stored_cols(shape[1]))

    def nbytes(self, rows, cols):
        """Bytes of rows x cols values (cols in whole blocks, a partial block counted whole)."""
        return int(rows * math.ceil(cols / self.block) * self.block_bytes)

    def fits(self, cols):
        """Whether rows of `cols` values can be stored in this type (whole blocks)."""
        return cols % self.block == 0

    def stored_col_range(self, cols):
        """Stored entries [a, b) of a row that hold logical columns [c, d) (whole blocks; a
        last partial block allowed, as a Q4_0 row's end)."""
        c, d = cols
        return self.stored_cols(c), -(-d // self.block) * self.block_bytes // self.dtype.itemsize


TYPES = {t.name: t for t in (
    WeightType("q40", "Q4_0", 32, Q40_BLOCK_BYTES, np.dtype(np.uint8), quantize_q40,
               dequantize_q40, lambda b: _float_nonfinite(_block_scales(b, Q40_BLOCK_BYTES)),
               kernels.matmul_q40),
    WeightType("q80", "Q8_0", 32, Q80_BLOCK_BYTES, np.dtype(np.uint8), quantize_q80,
               dequantize_q80, lambda b: _float_nonfinite(_block_scales(b, Q80_BLOCK_BYTES)),
               lambda x, w: kernels.matmul_tiles(x, w, dequantize_q80)),
    WeightType("bf16", "BF16", 1, 2, np.dtype(np.uint16), quantize_bf16, dequantize_bf16,
               _bf16_nonfinite, lambda x, w: kernels.matmul_tiles(x, w, dequantize_bf16)),
    WeightType("f16", "F16", 1, 2, np.dtype(np.float16), quantize_f16, _as_f32,
               _float_nonfinite, lambda x, w: kernels.matmul_tiles(x, w, _as_f32)),
    WeightType("f32", "F32", 1, 4, np.dtype(np.float32), _as_f32, _as_f32, _float_nonfinite,
               lambda x, w: x @ w.T),
)}
NAMES = tuple(TYPES)


def weight_type(name):
    """The WeightType called `name`; ValueError for an unknown one."""
    try:
        return TYPES[name]
    except KeyError:
        raise ValueError(f"unknown weight type {name!r}; dllm has {', '.join(NAMES)}") from None


def describe_types(types):
    """{tensor: type} of a model's matrices in a few words: the type most of them have, then
    the tensors that differ ("q40"; "q40, output q80, tok_embeddings f32"; "q80, 7 q40")."""
    matrices = {name: t for name, t in types.items()
                if not (name == "norm" or name.endswith("_norm"))}
    if not matrices:
        return "f32"
    counts = Counter(matrices.values())
    main = max(counts, key=lambda t: (counts[t], t == matrices.get("layers/0/wq")))
    others = {name: t for name, t in matrices.items() if t != main}
    if len(others) <= 3:
        return ", ".join([main] + [f"{name} {t}" for name, t in sorted(others.items())])
    rest = Counter(others.values())
    return ", ".join([main] + [f"{n} {t}" for t, n in sorted(rest.items())])


class Matrix:
    """A weight matrix as a rank holds it: the stored array and its WeightType.
    shape: the logical (rows, cols)."""
    __slots__ = ("data", "wtype", "shape")

    def __init__(self, data, wtype):
        cols = data.shape[1] * data.dtype.itemsize // wtype.block_bytes * wtype.block
        self.data, self.wtype, self.shape = data, wtype, (data.shape[0], cols)

    @property
    def nbytes(self):
        return self.data.nbytes

    def rows(self, ids):
        """Rows `ids` (an int array) as float32 (len(ids), cols): the embedding's lookup."""
        return self.wtype.dequantize(self.data[ids])
