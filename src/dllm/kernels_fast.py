"""Compiled kernels of the "fast" backend (numba; the optional extra ``dllm[fast]``).

Q4_0 x Q8_0 as GGML's ``ggml_vec_dot_q4_0_q8_0`` does it: the matmul input is quantized to
Q8_0 once per input vector (``quantize_input``), each block's integer dot product of the 4-bit
weight codes and the 8-bit input codes is scaled by both blocks' f16 scales and summed in
float32. ``kernels.matmul_q40_q80_ref`` is the slow reference twin of exactly this arithmetic.

Weight layout for SIMD (``pack_q40``, done once at load; the file format is unchanged).
GGML's row-major blocks make every block's dot product a horizontal sum across vector lanes.
Repacked, the lanes are rows instead: GROUP_ROWS rows form a group, and within a group, for
block b and code byte j, the GROUP_ROWS rows' bytes lie side by side:

    codes  (groups, nb, 16, GROUP_ROWS) uint8    code byte j of block b of each row
    scales (groups, nb, GROUP_ROWS)     uint16   the blocks' f16 scale bits

so one vector op handles one byte position of many rows, each lane accumulates its own row,
and no horizontal sums are needed: the same 18 bytes per 32 weights as the file (0.5625
bytes per weight). Rows beyond the last whole group are packed in groups of TAIL_ROWS, the
last one padded with at most TAIL_ROWS - 1 zero rows.

The block dot product in int16 lanes: a code byte c holds lo + 16 hi (lo for element j, hi for
element j+16), so with input codes qj, qj16 of the block

    (lo - 8) qj + (hi - 8) qj16 = c qj + hi (qj16 - 16 qj) - 8 (qj + qj16)

summed over j: the raw byte times qj, plus the high nibble times a precomputed difference,
starting from -8 sum(q). Every term is computed modulo 2^16 (int16 lanes wrap) and the true
sum, at most 32 * 8 * 127 = 32512 in magnitude, fits int16, so the wrapped result is exact.

T > 1 rows (prefill, and K sequences decoding together when serving) are quantized to Q8_0
row by row as one row alone would be, and multiplied by the C extension dllm._gemm_q40_q80
(AVX2's u8 x s8 pair multiply, vpmaddubsw, which numba's loops never emit; built by
setup.py) with the same block sums and the same float32 operations in the same order as the
decode kernel: row t of a T-row product equals row t decoded alone, bit for bit, so a prompt
prefilled gives the very numbers it gives decoded token by token. Where the extension is
absent or the CPU lacks AVX2, prefill dequantizes tiles and multiplies float32 inputs by BLAS
(gemm_q40) and serving's rows run the numba kernel _gemm_rows_groups (exact, slower);
`gemm_isa()` says which, and the run's conditions record it.
"""
import ctypes
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from numba import njit, prange

from .quant import Q40_BLOCK_BYTES

try:
    from . import _gemm_q40_q80
except ImportError:      # built without a C compiler (setup.py's optional extension)
    _gemm_q40_q80 = None

_C_ISA = None if _gemm_q40_q80 is None or _gemm_q40_q80.isa() == "none" else _gemm_q40_q80.isa()

GROUP_ROWS = 128
TAIL_ROWS = 32           # a multiple of the C kernel's 32-row chunk
# Rows of f32 weights dequantized per BLAS call and thread when T > 1 (prefill): one tile's
# float32 copy (PREFILL_TILE_ROWS x n x 4 bytes per thread, 2 MB at n = 4096) is scratch
# reused for the call.
PREFILL_TILE_ROWS = 128

# f16 bits -> float32, the whole table (256 KB): numba has no float16 type.
F16_TO_F32 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(
    np.float32)


class Q40Packed:
    """A Q4_0 matrix of `rows` x `n` weights in the SIMD layout above (see pack_q40)."""
    quant = "q40"

    def __init__(self, rows, n, codes, scales, tail_codes, tail_scales):
        self.rows, self.n = rows, n
        self.codes, self.scales = codes, scales
        self.tail_codes, self.tail_scales = tail_codes, tail_scales
        self.main_rows = codes.shape[0] * GROUP_ROWS
        self.padded_rows = self.main_rows + tail_codes.shape[0] * TAIL_ROWS  # kernels' output

    @property
    def nbytes(self):
        return sum(a.nbytes for a in (self.codes, self.scales, self.tail_codes, self.tail_scales))

    @property
    def shape(self):
        return (self.rows, self.n)


HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE, _MADV_COLLAPSE = 14, 25      # Linux's madvise advice values (6.1+ for 25)


def _libc_madvise():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


_madvise = _libc_madvise() if sys.platform.startswith("linux") else None


def prefer_huge_pages(array):
    """Ask Linux to back the 2 MB-aligned part of `array`'s memory with huge pages, now
    (madvise MADV_HUGEPAGE, then MADV_COLLAPSE, which moves pages already touched in 4 KB
    pages: the usual case for arrays that reuse freed heap memory). Decoding streams every
    weight once per token, and in 4 KB pages this VM streamed them a median 7% slower, up to
    a quarter (kernels/huge_pages.py, docs/benchmarks.md). Best effort: on other systems,
    older kernels or a refusal it changes nothing. Returns array."""
    if _madvise is None or array.nbytes < 2 * HUGE_PAGE:
        return array
    start = -(-array.ctypes.data // HUGE_PAGE) * HUGE_PAGE
    end = (array.ctypes.data + array.nbytes) // HUGE_PAGE * HUGE_PAGE
    if end > start:
        for advice in (_MADV_HUGEPAGE, _MADV_COLLAPSE):
            _madvise(start, end - start, advice)
    return array


def pack_q40(w_q40):
    """Q4_0 bytes (rows, nb*18) uint8 -> Q40Packed; the input is not kept."""
    rows, row_bytes = w_q40.shape
    nb = row_bytes // Q40_BLOCK_BYTES
    main = rows // GROUP_ROWS * GROUP_ROWS
    codes, scales = _pack_groups(w_q40[:main], GROUP_ROWS)
    # a copy, even when empty: a view would keep the whole stored matrix alive
    tail = np.concatenate([w_q40[main:], np.zeros((-(rows - main) % TAIL_ROWS, row_bytes),
                                                  np.uint8)])
    tail_codes, tail_scales = _pack_groups(tail, TAIL_ROWS)
    return Q40Packed(rows, nb * 32, codes, scales, tail_codes, tail_scales)


def _pack_groups(w_q40, group):
    rows, row_bytes = w_q40.shape
    nb = row_bytes // Q40_BLOCK_BYTES
    blocks = w_q40.reshape(rows // group, group, nb, Q40_BLOCK_BYTES)
    codes = np.ascontiguousarray(blocks[..., 2:].transpose(0, 2, 3, 1))     # (G, nb, 16, R)
    scale_bytes = np.ascontiguousarray(blocks[..., :2].transpose(0, 2, 1, 3))  # (G, nb, R, 2)
    return codes, scale_bytes.view("<u2")[..., 0]


def unpack_q40(packed):
    """Q40Packed -> the Q4_0 bytes (rows, nb*18) it was made from (for tests and export)."""
    parts = []
    for codes, scales in ((packed.codes, packed.scales),
                          (packed.tail_codes, packed.tail_scales)):
        G, nb, _, R = codes.shape
        blocks = np.empty((G, R, nb, Q40_BLOCK_BYTES), np.uint8)
        blocks[..., 2:] = codes.transpose(0, 3, 1, 2)
        blocks[..., :2] = scales.astype("<u2").transpose(0, 2, 1)[..., None].view(np.uint8)
        parts.append(blocks.reshape(G * R, nb * Q40_BLOCK_BYTES))
    return np.concatenate(parts)[:packed.rows]


# --- the input: Q8_0 once per vector ------------------------------------------------------

@njit(nogil=True, cache=True)
def _q80_codes(x, codes, d32):
    """quantize_row_q8_0 without the f16 rounding of d: x (nb*32,) float32 -> codes (nb, 32)
    int8 (roundf of x / d) and d32 (nb,) float32 = amax / 127 (see quant.quantize_q80)."""
    for b in range(codes.shape[0]):
        amax = np.float32(0.0)
        for j in range(32):
            a = abs(x[b * 32 + j])
            if a > amax:
                amax = a
        d = amax / np.float32(127.0)
        inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
        d32[b] = d
        for j in range(32):
            v = x[b * 32 + j] * inv
            t = np.float32(np.trunc(v))
            if abs(v - t) >= np.float32(0.5):     # roundf: halves away from zero
                t += np.float32(1.0) if v > 0 else np.float32(-1.0)
            codes[b, j] = np.int8(t)


@njit(nogil=True, cache=True)
def _q80_lanes(codes, lo, diff, offset):
    """The int16 operands of the numba decode kernel's block dot product (module
    docstring): lo = q_j, diff = q_{j+16} - 16 q_j (j < 16) and offset = -8 sum(q) mod 2^16,
    per block."""
    for b in range(codes.shape[0]):
        total = 0
        for j in range(16):
            a, c = np.int32(codes[b, j]), np.int32(codes[b, j + 16])
            lo[b, j] = np.int16(a)
            diff[b, j] = np.int16(c - 16 * a)
            total += a + c
        offset[b] = np.int16(-8 * total)


@njit(nogil=True, cache=True)
def _q80_pairs(codes, pairs, offset):
    """The C kernel's operands of blocks codes (nb, 32) int8: pairs[b, j] = the codes j and
    j + 16 of block b as the low and high byte of an int16, offset[b] = -8 sum(q) mod 2^16."""
    for b in range(codes.shape[0]):
        total = 0
        for j in range(16):
            a, c = np.int32(codes[b, j]), np.int32(codes[b, j + 16])
            pairs[b, j] = np.int16(np.uint16(a & 0xFF) | np.uint16((c & 0xFF) << 8))
            total += a + c
        offset[b] = np.int16(-8 * total)


@njit(nogil=True, cache=True)
def _f16_bits(f32_bits):
    """float32 bits (as uint32) -> the bits of the nearest float16 (ties to even; beyond
    the f16 range -> inf, NaN stays NaN), as numpy's astype(float16) rounds."""
    sign = (f32_bits >> 16) & 0x8000
    exponent = np.int32((f32_bits >> 23) & 0xFF)
    mantissa = f32_bits & 0x7FFFFF
    if exponent == 0xFF:
        return np.uint16(sign | 0x7C00 | (0x200 if mantissa else 0))
    e = exponent - 127 + 15
    if e >= 0x1F:
        return np.uint16(sign | 0x7C00)
    if e <= 0:                               # an f16 subnormal, or zero
        if e < -10:
            return np.uint16(sign)
        mantissa |= 0x800000
        shift = np.uint32(14 - e)
        half = mantissa >> shift
        rest, halfway = mantissa & ((np.uint32(1) << shift) - 1), np.uint32(1) << (shift - 1)
    else:
        half = (np.uint32(e) << 10) | (mantissa >> 13)
        rest, halfway = mantissa & 0x1FFF, np.uint32(0x1000)
    if rest > halfway or (rest == halfway and (half & 1)):
        half += 1                            # a carry into the exponent is still right
    return np.uint16(sign | half)


@njit(nogil=True, cache=True)
def _q80_payload(x, out):
    """x (T, nb*32) float32 -> out (T, nb*34) uint8, quant.quantize_q80's bytes."""
    T, nb = x.shape[0], x.shape[1] // 32
    codes = np.empty((nb, 32), np.int8)
    d32 = np.empty(nb, np.float32)
    for t in range(T):
        _q80_codes(x[t], codes, d32)
        bits = d32.view(np.uint32)
        for b in range(nb):
            o = b * 34
            h = _f16_bits(bits[b])
            out[t, o], out[t, o + 1] = np.uint8(h & 0xFF), np.uint8(h >> 8)
            for j in range(32):
                out[t, o + 2 + j] = np.uint8(codes[b, j] & 0xFF)


def quantize_q80(x):
    """float32 (T, n) -> Q8_0 bytes (T, n/32*34), the bytes of quant.quantize_q80 (its
    numpy twin; GGML's quantize_row_q8_0), compiled."""
    T, n = x.shape
    out = np.empty((T, n // 32 * 34), np.uint8)
    _q80_payload(np.ascontiguousarray(x, np.float32), out)
    return out


@njit(nogil=True, cache=True)
def _scale_at(row, o):
    """The f16 scale of the Q8_0 block at byte o of row (uint8), as float32."""
    return F16_TO_F32[np.int32(row[o]) | (np.int32(row[o + 1]) << 8)]


@njit(nogil=True, cache=True)
def _dequantize_q80_rows(payload, out):
    """payload (T, nb*34) uint8 Q8_0 rows -> out (T, nb*32) float32 (any strides): d * q."""
    T, nb = payload.shape[0], payload.shape[1] // 34
    for t in range(T):
        for b in range(nb):
            o = b * 34
            d = _scale_at(payload[t], o)
            for j in range(32):
                out[t, b * 32 + j] = d * np.float32(np.int8(payload[t, o + 2 + j]))


def dequantize_q80(payload, out=None):
    """Q8_0 bytes (T, nb*34) -> float32 (T, nb*32), quant.dequantize_q80's values (its
    numpy twin), compiled; `out`, if given, a float32 (T, nb*32) array (a view is fine)."""
    if out is None:
        out = np.empty((payload.shape[0], payload.shape[1] // 34 * 32), np.float32)
    _dequantize_q80_rows(payload, out)
    return out


@njit(nogil=True, cache=True)
def _q80_operands(x, codes, scale, pairs, offset):
    """x (T, nb*32) float32 -> codes (T, nb, 32) int8 and scale (T, nb) float32 (the
    f16-rounded d) as quantize_row_q8_0 makes them, and the C kernel's pairs and offset."""
    T, nb = scale.shape
    d32 = np.empty(nb, np.float32)
    for t in range(T):
        _q80_codes(x[t], codes[t], d32)
        bits = d32.view(np.uint32)
        for b in range(nb):
            scale[t, b] = F16_TO_F32[_f16_bits(bits[b])]
        _q80_pairs(codes[t], pairs[t], offset[t])


@njit(nogil=True, cache=True)
def _q80_payload_operands(payload, codes, scale, pairs, offset):
    """Q8_0 bytes (T, nb*34) -> the same operands as _q80_operands, read from the bytes."""
    T, nb = scale.shape
    for t in range(T):
        for b in range(nb):
            o = b * 34
            scale[t, b] = _scale_at(payload[t], o)
            for j in range(32):
                codes[t, b, j] = np.int8(payload[t, o + 2 + j])
        _q80_pairs(codes[t], pairs[t], offset[t])


class Q80Input:
    """A (T, n) matmul input as Q8_0, each row exactly as quantize_row_q8_0 quantizes it
    alone, in the operands the kernels read (nb = n / 32 blocks per row): codes (T, nb, 32)
    int8, scale (T, nb) float32 (the f16-rounded d); for the C kernel pairs (T, nb, 16)
    int16 (the codes j and j + 16 of a block as the low and high byte) and offset (T, nb)
    int16; for the numba decode kernel lo, diff (T, nb, 16) int16 (module docstring),
    computed when first read; x (T, n) float32, the input itself (from_q80: its values)."""

    def __init__(self, x, payload=None):
        T, nb = (len(x), x.shape[1] // 32) if payload is None else (len(payload),
                                                                     payload.shape[1] // 34)
        self.codes, self.scale = np.empty((T, nb, 32), np.int8), np.empty((T, nb), np.float32)
        self.pairs, self.offset = np.empty((T, nb, 16), np.int16), np.empty((T, nb), np.int16)
        operands = self.codes, self.scale, self.pairs, self.offset
        if payload is None:
            _q80_operands(np.ascontiguousarray(x, np.float32), *operands)
        else:
            _q80_payload_operands(payload, *operands)
        self._x, self._payload, self._lo, self._diff = x, payload, None, None

    @classmethod
    def from_q80(cls, payload):
        """Q8_0 bytes (T, nb*34) uint8 -> the Q80Input of their values: what Q80Input of
        dequantize_q80(payload) holds (Q8_0 of Q8_0 values gives back their bytes: tested),
        without the float32 round trip."""
        return cls(None, payload)

    @property
    def x(self):
        if self._x is None:
            self._x = dequantize_q80(self._payload)
        return self._x

    @property
    def lo(self):
        self._lanes()
        return self._lo

    @property
    def diff(self):
        self._lanes()
        return self._diff

    def _lanes(self):
        if self._lo is None:
            T, nb = self.scale.shape
            lo, diff = np.empty((T * nb, 16), np.int16), np.empty((T * nb, 16), np.int16)
            _q80_lanes(self.codes.reshape(T * nb, 32), lo, diff, np.empty(T * nb, np.int16))
            self._lo, self._diff = lo.reshape(T, nb, 16), diff.reshape(T, nb, 16)

    def __len__(self):
        return len(self.scale)


def quantize_input(x):
    """x (T, n) float32 -> what matmul takes: Q80Input, once for every matmul of one input
    (wq, wk, wv; w1, w3); x itself when n is not whole Q8_0 blocks (no Q4_0 matmul reads it)
    or when T > 1 rows will meet no integer kernel (gemm_isa() is None: prefill multiplies
    float32 inputs by dequantized tiles)."""
    if x.shape[1] % 32 or not _quantizes(len(x)):
        return x
    return Q80Input(x)


def _quantizes(T):
    """Whether T input rows meet an integer kernel (quantize_input's rule)."""
    return T == 1 or (T > 1 and gemm_isa() is not None)


def input_from_q80(payload):
    """Q8_0 bytes (T, nb*34) -> what quantize_input makes of their float32 values, from the
    bytes themselves (Q80Input.from_q80) wherever quantize_input would quantize."""
    if not _quantizes(len(payload)):
        return dequantize_q80(payload)
    return Q80Input.from_q80(payload)


# --- the float32 steps between the matmuls ------------------------------------------------

@njit(nogil=True, cache=True)
def _rmsnorm_rows(x, weight, eps, out):
    T, d = x.shape
    for t in range(T):
        total = 0.0                          # float64: one sum per row, in order
        for i in range(d):
            total += np.float64(x[t, i]) * np.float64(x[t, i])
        inv = np.float32(1.0) / np.float32(math.sqrt(np.float32(total / d) + eps))
        for i in range(d):
            out[t, i] = (x[t, i] * inv) * weight[i]


def rmsnorm(x, weight, eps):
    """kernels.rmsnorm, compiled, row by row (the sum of squares in float64)."""
    out = np.empty(x.shape, np.float32)
    _rmsnorm_rows(np.ascontiguousarray(x, np.float32), np.ascontiguousarray(weight, np.float32),
                  np.float32(eps), out)
    return out


def swiglu(gate, up):
    """kernels.swiglu (silu(gate) * up, float32) in place of one temporary: numpy's float32
    exp is vectorized, which numba's scalar exp is not."""
    out = np.exp(-gate)
    out += np.float32(1.0)
    np.divide(gate, out, out=out)
    out *= up
    return out


@njit(nogil=True, cache=True)
def _rope_rows(x, cos, sin, out):
    T, H, hd = x.shape
    for t in range(T):
        for h in range(H):
            for i in range(hd // 2):
                even, odd = x[t, h, 2 * i], x[t, h, 2 * i + 1]
                c, s = cos[t, i], sin[t, i]
                out[t, h, 2 * i] = even * c - odd * s
                out[t, h, 2 * i + 1] = even * s + odd * c


def rope(x, cos, sin):
    """kernels.rope (interleaved pairs; x (T, heads, head_dim), cos, sin (T, head_dim/2)),
    compiled: the same float32 operations."""
    out = np.empty(x.shape, np.float32)
    _rope_rows(np.ascontiguousarray(x, np.float32), np.ascontiguousarray(cos, np.float32),
               np.ascontiguousarray(sin, np.float32), out)
    return out


# --- decode: Q4_0 x Q8_0 matrix-vector ----------------------------------------------------

@njit(nogil=True, cache=True)
def _gemv_groups(codes, scales, g0, g1, lo, diff, offset, x_scale, out):
    """out[(g - g0) * R + i] = row i of group g times the input, for groups g0..g1-1."""
    nb, R = codes.shape[1], codes.shape[3]
    block_sum = np.empty(R, np.int16)
    acc = np.empty(R, np.float32)
    for g in range(g0, g1):
        acc[:] = 0
        for b in range(nb):
            start = offset[b]
            for i in range(R):
                block_sum[i] = start
            for j in range(16):
                q, dq = lo[b, j], diff[b, j]
                for i in range(R):
                    c = np.uint16(codes[g, b, j, i])
                    block_sum[i] = np.int16(block_sum[i] + c * q + (c >> 4) * dq)
            xd = x_scale[b]
            for i in range(R):
                acc[i] += np.float32(block_sum[i]) * (F16_TO_F32[scales[g, b, i]] * xd)
        for i in range(R):
            out[(g - g0) * R + i] = acc[i]


@njit(nogil=True, cache=True, parallel=True)
def _gemv_parallel(codes, scales, lo, diff, offset, x_scale, out, chunks):
    """_gemv_groups over all groups, split into `chunks` contiguous runs of groups, one per
    thread (numba's threading layer)."""
    G, R = codes.shape[0], codes.shape[3]
    for c in prange(chunks):
        g0, g1 = c * G // chunks, (c + 1) * G // chunks
        _gemv_groups(codes, scales, g0, g1, lo, diff, offset, x_scale, out[g0 * R:g1 * R])


def gemv_q40_q80(xq, w, threads=1):
    """Q80Input of x (1, n) times Q40Packed W (rows, n), transposed -> (1, rows) float32."""
    check_width(xq, w)
    out = np.empty(w.padded_rows, np.float32)
    operands = (xq.lo[0], xq.diff[0], xq.offset[0], xq.scale[0])
    groups = w.codes.shape[0]
    if threads > 1 and groups >= threads:
        _gemv_parallel(w.codes, w.scales, *operands, out[:w.main_rows], threads)
    elif groups:
        _gemv_groups(w.codes, w.scales, 0, groups, *operands, out[:w.main_rows])
    if w.tail_codes.shape[0]:
        _gemv_groups(w.tail_codes, w.tail_scales, 0, w.tail_codes.shape[0], *operands,
                     out[w.main_rows:])
    return out[None, :w.rows]


def check_width(xq, w):
    if xq.scale.shape[1] * 32 != w.n:
        raise ValueError(f"input width {xq.scale.shape[1] * 32} does not match a Q4_0 matrix "
                         f"of {w.n} columns")


# --- T > 1 rows: Q4_0 x Q8_0 with the weights read once for all rows ---------------------

def gemm_isa():
    """The C kernel's instruction set on this machine ("avx2"), or None where T > 1 rows
    fall back to numba (no extension built, or no AVX2: see the module docstring)."""
    if _C_ISA is None or os.environ.get("DLLM_GEMM") == "numba":
        return None
    return _C_ISA


_pools = {}


def _pool(threads):
    if threads not in _pools:
        _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="dllm-gemm")
    return _pools[threads]


def gemm_q40_q80(xq, w, threads=1):
    """Q80Input of x (T, n) times Q40Packed W (rows, n), transposed -> (T, rows) float32, by
    the C kernel; row t equals gemv_q40_q80 of row t alone, bit for bit. The groups of rows
    are split over `threads` threads (the kernel releases the GIL)."""
    check_width(xq, w)
    T, nb = len(xq), w.n // 32
    out = np.empty((T, w.padded_rows), np.float32)
    calls = []
    for codes, scales, R, base in ((w.codes, w.scales, GROUP_ROWS, 0),
                                   (w.tail_codes, w.tail_scales, TAIL_ROWS, w.main_rows)):
        G = codes.shape[0]
        parts = min(threads, G)
        calls += [(codes, scales, R, nb, p * G // parts, (p + 1) * G // parts, xq.pairs,
                   xq.offset, xq.scale, T, out, w.padded_rows, base) for p in range(parts)]
    if threads > 1:
        list(_pool(threads).map(lambda a: _gemm_q40_q80.gemm(*a), calls))
    else:
        for a in calls:
            _gemm_q40_q80.gemm(*a)
    return out[:, :w.rows]


@njit(nogil=True, cache=True)
def _gemm_rows_groups(codes, scales, g0, g1, lo, diff, offset, x_scale, out):
    """out[t, (g - g0) * R + i] = row i of group g times input row t: for every row t the
    very operations of _gemv_groups, in its order, while the group's block stays in cache."""
    nb, R, K = codes.shape[1], codes.shape[3], lo.shape[0]
    block_sum = np.empty(R, np.int16)
    acc = np.empty((K, R), np.float32)
    for g in range(g0, g1):
        acc[:] = 0
        for b in range(nb):
            for t in range(K):
                start = offset[t, b]
                for i in range(R):
                    block_sum[i] = start
                for j in range(16):
                    q, dq = lo[t, b, j], diff[t, b, j]
                    for i in range(R):
                        c = np.uint16(codes[g, b, j, i])
                        block_sum[i] = np.int16(block_sum[i] + c * q + (c >> 4) * dq)
                xd = x_scale[t, b]
                for i in range(R):
                    acc[t, i] += np.float32(block_sum[i]) * (F16_TO_F32[scales[g, b, i]] * xd)
        for t in range(K):
            for i in range(R):
                out[t, (g - g0) * R + i] = acc[t, i]


@njit(nogil=True, cache=True, parallel=True)
def _gemm_rows_parallel(codes, scales, lo, diff, offset, x_scale, out, chunks):
    G, R = codes.shape[0], codes.shape[3]
    for c in prange(chunks):
        g0, g1 = c * G // chunks, (c + 1) * G // chunks
        _gemm_rows_groups(codes, scales, g0, g1, lo, diff, offset, x_scale,
                          out[:, g0 * R:g1 * R])


def gemm_rows_q40_q80(xq, w, threads=1):
    """Q80Input of x (K, n) times Q40Packed W (rows, n), transposed -> (K, rows) float32, by
    numba (where gemm_isa() is None); row t equals gemv_q40_q80 of row t alone, bit for bit."""
    check_width(xq, w)
    out = np.empty((len(xq.lo), w.padded_rows), np.float32)
    operands = (xq.lo, xq.diff, xq.offset, xq.scale)
    groups = w.codes.shape[0]
    if threads > 1 and groups >= threads:
        _gemm_rows_parallel(w.codes, w.scales, *operands, out[:, :w.main_rows], threads)
    elif groups:
        _gemm_rows_groups(w.codes, w.scales, 0, groups, *operands, out[:, :w.main_rows])
    if w.tail_codes.shape[0]:
        _gemm_rows_groups(w.tail_codes, w.tail_scales, 0, w.tail_codes.shape[0], *operands,
                          out[:, w.main_rows:])
    return out[:, :w.rows]


def matmul_rows(xq, w, threads=1):
    """Q80Input of K rows (or float32 rows where n is not whole blocks) times W, each row
    exactly as matmul multiplies it alone (T = 1)."""
    if isinstance(w, Q40Packed):
        if gemm_isa():
            return gemm_q40_q80(xq, w, threads)
        return gemm_rows_q40_q80(xq, w, threads)
    rows = xq.x if isinstance(xq, Q80Input) else xq
    return np.concatenate([matmul(quantize_input(rows[t:t + 1]), w, threads)
                           for t in range(len(rows))])


# --- decode: Q8_0 x Q8_0 matrix-vector (GGML's ggml_vec_dot_q8_0_q8_0) ---------------------

@njit(nogil=True, cache=True)
def _gemv_q80_rows(codes, scale_bytes, r0, r1, x_codes, x_scale, out):
    """out[r - r0] = row r of a stored Q8_0 matrix times the input, rows r0..r1-1. codes:
    the matrix's bytes as int8 (rows, nb*34), scale_bytes the same bytes as uint8."""
    nb = x_codes.shape[0]
    for r in range(r0, r1):
        acc = np.float32(0.0)
        for b in range(nb):
            o = b * 34
            block_sum = np.int32(0)
            for j in range(32):
                block_sum += np.int32(codes[r, o + 2 + j]) * np.int32(x_codes[b, j])
            d = _scale_at(scale_bytes[r], o)
            acc += np.float32(block_sum) * (d * x_scale[b])
        out[r - r0] = acc


@njit(nogil=True, cache=True, parallel=True)
def _gemv_q80_parallel(codes, scale_bytes, x_codes, x_scale, out, chunks):
    rows = codes.shape[0]
    for c in prange(chunks):
        r0, r1 = c * rows // chunks, (c + 1) * rows // chunks
        _gemv_q80_rows(codes, scale_bytes, r0, r1, x_codes, x_scale, out[r0:r1])


def gemv_q80_q80(xq, w_q80, threads=1):
    """Q80Input of x (1, n) times a stored Q8_0 matrix (rows, n/32*34) uint8, transposed ->
    (1, rows) float32: each block's int8 x int8 dot product is an exact int32, scaled by
    both f16 scales (the reference twin: kernels.matmul_q80_q80_ref)."""
    rows, row_bytes = w_q80.shape
    x_codes, x_scale = xq.codes[0], xq.scale[0]
    if x_codes.shape[0] * 34 != row_bytes:
        raise ValueError(f"input width {x_codes.shape[0] * 32} does not match a Q8_0 matrix "
                         f"of {row_bytes // 34 * 32} columns")
    out = np.empty(rows, np.float32)
    operands = (w_q80.view(np.int8), w_q80, x_codes, x_scale)
    if threads > 1 and rows >= threads:
        _gemv_q80_parallel(*operands, out, threads)
    else:
        _gemv_q80_rows(operands[0], operands[1], 0, rows, x_codes, x_scale, out)
    return out[None]


# --- attention, one query row at a time ------------------------------------------------

@njit(nogil=True, cache=True, fastmath=True)
def _attention_rows(q, k_cache, v_cache, pos, head_kv, out):
    """out[t, h] = softmax(q[t, h] . keys 0..pos+t / sqrt(hd)) . values, for every row t
    and head h: each row over exactly its own keys, by the same loops whatever T is."""
    T, H, hd = q.shape
    scale = np.float32(1.0 / math.sqrt(hd))
    scores = np.empty(pos + T, np.float32)
    for t in range(T):
        S = pos + t + 1
        for h in range(H):
            kv = head_kv[h]
            top = np.float32(-np.inf)
            for s in range(S):
                dot = np.float32(0.0)
                for d in range(hd):
                    dot += q[t, h, d] * k_cache[kv, s, d]
                scores[s] = dot * scale
                top = max(top, scores[s])
            total = np.float32(0.0)
            for s in range(S):
                scores[s] = np.exp(scores[s] - top)
                total += scores[s]
            inv = np.float32(1.0) / total
            for d in range(hd):
                out[t, h, d] = 0.0
            for s in range(S):
                weight = scores[s] * inv
                for d in range(hd):
                    out[t, h, d] += weight * v_cache[kv, s, d]


def attention(q, k_cache, v_cache, pos, head_kv):
    """kernels.attention's arguments and result ((T, H, hd) -> (T, H * hd) float32),
    compiled, one query row at a time: row t equals that row attended alone (T = 1 at
    position pos + t), bit for bit, so a prompt's numbers do not depend on how it is cut
    into blocks. Reference twin: kernels.attention_ref."""
    T, H, hd = q.shape
    out = np.empty((T, H, hd), np.float32)
    _attention_rows(np.ascontiguousarray(q, np.float32), k_cache, v_cache, pos,
                    np.asarray(head_kv, np.int64), out)
    return out.reshape(T, H * hd)


# --- prefill: dequantized tiles times f32 inputs (BLAS) -----------------------------------

@njit(nogil=True, cache=True)
def _dequant_groups_t(codes, scales, g0, g1, out_t):
    """Groups g0..g1-1 as float32, transposed: out_t (n, (g1 - g0) * R), column = row."""
    nb, R = codes.shape[1], codes.shape[3]
    d = np.empty(R, np.float32)
    for g in range(g0, g1):
        c0 = (g - g0) * R
        for b in range(nb):
            for i in range(R):
                d[i] = F16_TO_F32[scales[g, b, i]]
            for j in range(16):
                # one contiguous row of the tile at a time: the loops over i vectorize
                code_j = codes[g, b, j]
                lo = out_t[b * 32 + j, c0:c0 + R]
                for i in range(R):
                    lo[i] = np.float32(np.int32(code_j[i] & 15) - 8) * d[i]
                hi = out_t[b * 32 + j + 16, c0:c0 + R]
                for i in range(R):
                    hi[i] = np.float32(np.int32(code_j[i] >> 4) - 8) * d[i]


@njit(nogil=True, cache=True, parallel=True)
def _dequant_parallel(codes, scales, g0, g1, out_t, chunks):
    R = codes.shape[3]
    for c in prange(chunks):
        a = g0 + c * (g1 - g0) // chunks
        b = g0 + (c + 1) * (g1 - g0) // chunks
        _dequant_groups_t(codes, scales, a, b, out_t[:, (a - g0) * R:(b - g0) * R])


def gemm_q40(x, w, threads=1):
    """x (T, n) float32 times Q40Packed W transposed -> (T, rows) float32: tiles of rows are
    dequantized (exact in float32) into one scratch tile and multiplied by BLAS sgemm.

    The tile is dequantized transposed, (n, tile rows), so that its rows are written
    contiguously, and each product lands in a contiguous run of out_t (rows, T).
    """
    T, n = x.shape
    if n != w.n:
        raise ValueError(f"input width {n} does not match a Q4_0 matrix of {w.n} columns")
    x_t = np.ascontiguousarray(x, np.float32).T                          # (n, T)
    out_t = np.empty((w.padded_rows, T), np.float32)
    tile_rows = PREFILL_TILE_ROWS * threads      # a group of rows per thread and tile at least
    scratch = np.empty(n * tile_rows, np.float32)
    for codes, scales, R, base in ((w.codes, w.scales, GROUP_ROWS, 0),
                                   (w.tail_codes, w.tail_scales, TAIL_ROWS, w.main_rows)):
        groups, step = codes.shape[0], tile_rows // R
        for g0 in range(0, groups, step):
            g1 = min(g0 + step, groups)
            tile_t = scratch[:n * (g1 - g0) * R].reshape(n, (g1 - g0) * R)
            if threads > 1 and g1 - g0 >= threads:
                _dequant_parallel(codes, scales, g0, g1, tile_t, threads)
            else:
                _dequant_groups_t(codes, scales, g0, g1, tile_t)
            np.matmul(tile_t.T, x_t, out=out_t[base + g0 * R:base + g1 * R])
    return np.ascontiguousarray(out_t[:w.rows].T)


def matmul(x, w, threads=1):
    """quantize_input(x) or x (T, n), times W transposed -> (T, rows) float32. W: a
    Q40Packed (the C kernel where it runs, else numba's decode kernel), or a weight_types.Matrix
    (Q8_0 decodes here; every other case runs its type's numpy kernel: dequantized tiles
    times BLAS)."""
    if isinstance(x, Q80Input):
        if isinstance(w, Q40Packed):
            if gemm_isa():       # as fast as numba's gemv at T = 1 or faster (docs/benchmarks.md)
                return gemm_q40_q80(x, w, threads)
            return gemv_q40_q80(x, w, threads)
        if w.wtype.name == "q80" and len(x) == 1:
            return gemv_q80_q80(x, w.data, threads)
        x = x.x
    if isinstance(w, Q40Packed):
        return gemm_q40(x, w, threads)
    return w.wtype.matmul(x, w.data)


def warm_up(threads=1):
    """Call every kernel once on tiny inputs, so that numba's compilation (the first run on a
    machine, a few seconds) or the loading of its cache (about 0.3 s) happens now, while a
    model loads, rather than inside the first timed prefill or decode step."""
    w = pack_q40(np.zeros((GROUP_ROWS * threads + TAIL_ROWS, Q40_BLOCK_BYTES), np.uint8))
    w_q80 = np.zeros((2 * threads, 34), np.uint8)
    for T in (1, 2):
        x = quantize_input(np.ones((T, 32), np.float32))
        matmul(x, w, threads)
        if T == 1:
            gemv_q80_q80(x, w_q80, threads)
            gemv_q80_q80(x, w_q80[:1], 1)
    matmul_rows(Q80Input(np.ones((2, 32), np.float32)), w, threads)
    cache = np.zeros((1, 2, 32), np.float32)
    attention(np.ones((1, 1, 32), np.float32), cache, cache, 0, np.zeros(1, np.int64))
    row = np.ones((1, 32), np.float32)
    Q80Input.from_q80(quantize_q80(row)).lo, rmsnorm(row, row[0], 1e-5), swiglu(row, row)
    rope(row.reshape(1, 1, 32), row[:, :16], row[:, :16])


def set_threads(n):
    """numba's thread count for the parallel kernels (at most the cores numba saw)."""
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
