"""GGML Q4_0 and Q8_0 block quantization, bit-identical to ggml's ``quantize_row_q4_0_ref`` and
``quantize_row_q8_0_ref``.

Byte layout. A row of n float32 values (n a multiple of ``BLOCK`` = 32) is cut into nb = n/32
blocks, stored back to back; every block starts with its scale ``d`` as an IEEE float16,
little-endian (2 bytes), followed by its codes:

- Q4_0, 18 bytes per block: 16 bytes ``qs``; byte j holds element j in its low nibble and
  element j+16 in its high nibble, each as an unsigned code c in 0..15. Value = d * (c - 8).
- Q8_0, 34 bytes per block: 32 int8 codes q, one per element in order. Value = d * q.

Shapes and dtypes: ``quantize_q40`` maps float32 (..., n) to uint8 (..., nb*18) and
``quantize_q80`` float32 (..., n) to uint8 (..., nb*34); the dequantize functions map those back
to float32 (..., nb*32). Leading axes are independent rows; blocks never straddle rows.

Every fast function is vectorized numpy over all blocks at once; each has a ``*_ref`` twin written
as plain per-block, per-element loops that follow the C reference line by line, kept to test the
fast ones. Dequantization is exact in float32 (an 11-bit scale times a code of at most 8 bits),
so any evaluation order gives the same bits.

Inputs holding NaN or infinity, or blocks whose scale is a float32 subnormal so that 1/d
overflows, make the C reference cast NaN/inf to an integer (undefined behaviour); codes for such
blocks are not specified here either.
"""
import math

import numpy as np

BLOCK = 32
Q40_BLOCK_BYTES = 18
Q80_BLOCK_BYTES = 34

# Blocks dequantized per step: keeps the int8 scratch (and the output slice being written) small
# enough to stay in cache between the nibble-unpacking pass and the multiply pass.
_DEQ_CHUNK_BLOCKS = 16384

_F16_LE = np.dtype("<f2")


def q40_row_bytes(n):
    """Bytes of a Q4_0 row of n values (n a multiple of 32)."""
    return _n_blocks(n) * Q40_BLOCK_BYTES


def q80_row_bytes(n):
    """Bytes of a Q8_0 row of n values (n a multiple of 32)."""
    return _n_blocks(n) * Q80_BLOCK_BYTES


def _n_blocks(n):
    n = int(n)
    if n < 0 or n % BLOCK:
        raise ValueError(
            f"row length n={n} is not a non-negative multiple of the block size {BLOCK}")
    return n // BLOCK


def _float_blocks(x):
    """float32 (..., n) -> ((..., n/32, 32) float32 view or copy, leading shape, nb)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 0:
        raise ValueError("expected an array of shape (..., n), got a scalar")
    nb = _n_blocks(x.shape[-1])
    lead = x.shape[:-1]
    return x.reshape(*lead, nb, BLOCK), lead, nb


def _byte_blocks(b, block_bytes, name):
    """uint8 (..., nb*block_bytes) -> ((..., nb, block_bytes) uint8, leading shape, nb)."""
    if isinstance(b, (bytes, bytearray, memoryview)):
        b = np.frombuffer(b, dtype=np.uint8)
    b = np.asarray(b)
    if b.dtype != np.uint8:
        if b.dtype.itemsize != 1 or b.dtype.kind not in "iub":
            raise TypeError(f"{name} data must be uint8 bytes, got dtype {b.dtype}")
        b = b.view(np.uint8)  # int8 / bool storage of the same bytes
    if b.ndim == 0:
        raise ValueError(f"expected {name} bytes of shape (..., nb*{block_bytes}), got a scalar")
    m = b.shape[-1]
    if m % block_bytes:
        raise ValueError(
            f"{name} row of {m} bytes is not a multiple of the {block_bytes}-byte block")
    nb = m // block_bytes
    lead = b.shape[:-1]
    # A view for contiguous rows and for row slices of a wider array; numpy copies otherwise.
    return b.reshape(*lead, nb, block_bytes), lead, nb


def _scales(blocks):
    """The float16 scale of each block (..., nb, bytes) as float32 (..., nb, 1)."""
    # The 2-byte slice is strided across blocks; copy it (2 bytes per block) so it can be
    # reinterpreted as float16 whatever the layout of the input.
    return np.ascontiguousarray(blocks[..., :2]).view(_F16_LE).astype(np.float32)


def _to_f16_bytes(d):
    """float32 (..., 1) -> its float16 little-endian bytes (..., 2), like GGML_FP32_TO_FP16:
    round to nearest even, subnormals kept, beyond the f16 range -> +-inf (no warning: that is
    the defined result, not an accident)."""
    with np.errstate(over="ignore"):
        return d.astype(_F16_LE).view(np.uint8)


def _out_array(out, shape):
    """Return (float32 array of `shape` to write, array to return). Validates a caller's `out`."""
    if out is None:
        res = np.empty(shape, dtype=np.float32)
        return res, res
    if not isinstance(out, np.ndarray) or out.dtype != np.float32:
        raise TypeError("out must be a float32 numpy array")
    if out.shape != shape:
        raise ValueError(f"out has shape {out.shape}, expected {shape}")
    return out, out


def _flat_dest(out_full):
    """(..., nb*32) float32 -> a (-1, 32) view of it, or None when that reshape would copy."""
    v = out_full.reshape(-1, BLOCK)
    # A copy is a fresh allocation, so a bounds check is enough to tell view from copy.
    return v if np.may_share_memory(v, out_full) else None


def _dequantize(b, out, block_bytes, name, fill):
    """Shared shell: validate, then fill(blocks (-1, block_bytes) uint8, dst (-1, 32) float32)."""
    blocks, lead, nb = _byte_blocks(b, block_bytes, name)
    out_full, res = _out_array(out, (*lead, nb * BLOCK))
    if out_full.size == 0:
        return res
    # A view unless the input is a strided layout that cannot be flattened (then a byte copy).
    flat = blocks.reshape(-1, block_bytes)
    dst = _flat_dest(out_full)
    if dst is None:  # e.g. a column slice of a wider out: fill scratch, then copy
        tmp = np.empty((flat.shape[0], BLOCK), dtype=np.float32)
        fill(flat, tmp)
        out_full[...] = tmp.reshape(out_full.shape)
    else:
        fill(flat, dst)
    return res


# --------------------------------------------------------------------------------------------
# Q4_0
# --------------------------------------------------------------------------------------------

def quantize_q40(x):
    """float32 (..., n) -> Q4_0 uint8 (..., n/32*18); n must be a multiple of 32."""
    xb, lead, nb = _float_blocks(x)
    ax = np.abs(xb)
    # argmax keeps the first of equal magnitudes, like the C loop's strict `amax < fabsf(v)`.
    imax = ax.argmax(axis=-1)[..., None]
    mx = np.take_along_axis(xb, imax, axis=-1)
    # A block of only +-0 never passes `amax < fabsf(v)`: C keeps its initial max = +0.0f,
    # so d = 0.0f / -8 = -0.0f, even where the first element is -0.0.
    mx = np.where(np.take_along_axis(ax, imax, axis=-1) > 0, mx, np.float32(0.0))
    d = mx / np.float32(-8.0)
    inv = np.zeros_like(d)
    np.divide(np.float32(1.0), d, out=inv, where=d != 0)  # id = d ? 1.0f/d : 0.0f
    v = xb * inv
    v += np.float32(8.5)
    # x*id lies in [-8, 8] up to rounding, so v >= ~0.49 and the float->uint8 cast truncates
    # toward zero exactly as C's (int8_t) does; then MIN(15, .).
    codes = v.astype(np.uint8)
    np.minimum(codes, np.uint8(15), out=codes)
    res = np.empty((*lead, nb, Q40_BLOCK_BYTES), dtype=np.uint8)
    res[..., :2] = _to_f16_bytes(d)  # round-to-nearest-even, subnormals kept
    qs = res[..., 2:]
    np.left_shift(codes[..., 16:], np.uint8(4), out=qs)
    qs |= codes[..., :16]
    return res.reshape(*lead, nb * Q40_BLOCK_BYTES)


def dequantize_q40(b, out=None):
    """Q4_0 uint8 (..., nb*18) -> float32 (..., nb*32), value = d * (code - 8).

    `b` may be any view whose last axis is a multiple of 18 bytes; `out`, if given, is a float32
    array of the result shape that is filled and returned.
    """
    return _dequantize(b, out, Q40_BLOCK_BYTES, "Q4_0", _fill_q40)


def _fill_q40(blocks, dst):
    total = blocks.shape[0]
    step = min(total, _DEQ_CHUNK_BLOCKS)
    codes = np.empty((step, BLOCK), dtype=np.uint8)
    for s in range(0, total, step):  # chunks of thousands of blocks, for cache locality
        e = min(s + step, total)
        qs = blocks[s:e, 2:]
        c = codes[:e - s]
        np.bitwise_and(qs, np.uint8(0x0F), out=c[:, :16])  # element j    <- low nibble
        np.right_shift(qs, np.uint8(4), out=c[:, 16:])  # element j+16 <- high nibble
        ci = c.view(np.int8)
        ci -= np.int8(8)
        np.multiply(ci, _scales(blocks[s:e]), out=dst[s:e])


def quantize_q40_ref(x):
    """Reference twin of quantize_q40: per-block, per-element loops after quantize_row_q4_0_ref."""
    x = np.asarray(x, dtype=np.float32)
    k = x.shape[-1]
    nb = _n_blocks(k)
    rows = x.reshape(-1, k)
    res = np.zeros((rows.shape[0], nb * Q40_BLOCK_BYTES), dtype=np.uint8)
    for r in range(rows.shape[0]):
        for i in range(nb):
            blk = rows[r, i * BLOCK:(i + 1) * BLOCK]
            amax = np.float32(0.0)
            mx = np.float32(0.0)
            for j in range(BLOCK):
                v = blk[j]
                if amax < abs(v):
                    amax = abs(v)
                    mx = v
            d = np.float32(mx / np.float32(-8.0))
            inv = np.float32(np.float32(1.0) / d) if d != 0 else np.float32(0.0)
            o = i * Q40_BLOCK_BYTES
            res[r, o:o + 2] = _to_f16_bytes(np.array([d], dtype=np.float32))
            for j in range(BLOCK // 2):
                x0 = np.float32(blk[j] * inv)
                x1 = np.float32(blk[BLOCK // 2 + j] * inv)
                xi0 = min(15, math.trunc(float(x0 + np.float32(8.5))))
                xi1 = min(15, math.trunc(float(x1 + np.float32(8.5))))
                res[r, o + 2 + j] = xi0 | (xi1 << 4)
    return res.reshape(*x.shape[:-1], nb * Q40_BLOCK_BYTES)


def dequantize_q40_ref(b):
    """Reference twin of dequantize_q40: per-block, per-element loops."""
    b = np.asarray(b, dtype=np.uint8)
    m = b.shape[-1]
    if m % Q40_BLOCK_BYTES:
        raise ValueError(f"Q4_0 row of {m} bytes is not a multiple of {Q40_BLOCK_BYTES}")
    nb = m // Q40_BLOCK_BYTES
    rows = b.reshape(-1, m)
    res = np.zeros((rows.shape[0], nb * BLOCK), dtype=np.float32)
    for r in range(rows.shape[0]):
        for i in range(nb):
            o = i * Q40_BLOCK_BYTES
            d = np.float32(np.frombuffer(rows[r, o:o + 2].tobytes(), dtype=_F16_LE)[0])
            for j in range(BLOCK // 2):
                byte = int(rows[r, o + 2 + j])
                res[r, i * BLOCK + j] = d * np.float32((byte & 0x0F) - 8)
                res[r, i * BLOCK + BLOCK // 2 + j] = d * np.float32((byte >> 4) - 8)
    return res.reshape(*b.shape[:-1], nb * BLOCK)


# --------------------------------------------------------------------------------------------
# Q8_0
# --------------------------------------------------------------------------------------------

def quantize_q80(x):
    """float32 (..., n) -> Q8_0 uint8 (..., n/32*34); n must be a multiple of 32."""
    xb, lead, nb = _float_blocks(x)
    amax = np.abs(xb).max(axis=-1, keepdims=True)
    d = amax / np.float32(127.0)
    inv = np.zeros_like(d)
    np.divide(np.float32(1.0), d, out=inv, where=d != 0)
    v = xb * inv
    # roundf (half away from zero) in float32 without a rounding add: v + 0.5f would round
    # 0.49999997 up to 1.0. t = trunc(v) and v - t are exact; 2*(v - t) is exact and its
    # truncation is +-1 exactly when |fraction| >= 0.5, else 0.
    t = np.trunc(v)
    v -= t
    v *= np.float32(2.0)
    np.trunc(v, out=v)
    v += t
    res = np.empty((*lead, nb, Q80_BLOCK_BYTES), dtype=np.uint8)
    res[..., :2] = _to_f16_bytes(d)
    np.copyto(res[..., 2:].view(np.int8), v, casting="unsafe")  # |v| <= 127: exact
    return res.reshape(*lead, nb * Q80_BLOCK_BYTES)


def dequantize_q80(b, out=None):
    """Q8_0 uint8 (..., nb*34) -> float32 (..., nb*32), value = d * q.

    `b` may be any view whose last axis is a multiple of 34 bytes; `out`, if given, is a float32
    array of the result shape that is filled and returned.
    """
    return _dequantize(b, out, Q80_BLOCK_BYTES, "Q8_0", _fill_q80)


def _fill_q80(blocks, dst):
    np.multiply(blocks[:, 2:].view(np.int8), _scales(blocks), out=dst)


def quantize_q80_ref(x):
    """Reference twin of quantize_q80: per-block, per-element loops after quantize_row_q8_0_ref."""
    x = np.asarray(x, dtype=np.float32)
    k = x.shape[-1]
    nb = _n_blocks(k)
    rows = x.reshape(-1, k)
    res = np.zeros((rows.shape[0], nb * Q80_BLOCK_BYTES), dtype=np.uint8)
    for r in range(rows.shape[0]):
        for i in range(nb):
            blk = rows[r, i * BLOCK:(i + 1) * BLOCK]
            amax = np.float32(0.0)
            for j in range(BLOCK):
                amax = max(amax, abs(blk[j]))
            d = np.float32(amax / np.float32(127.0))
            inv = np.float32(np.float32(1.0) / d) if d != 0 else np.float32(0.0)
            o = i * Q80_BLOCK_BYTES
            res[r, o:o + 2] = _to_f16_bytes(np.array([d], dtype=np.float32))
            for j in range(BLOCK):
                x0 = float(np.float32(blk[j] * inv))  # exact as a Python float
                res[r, o + 2 + j] = _roundf(x0) & 0xFF  # int8 two's complement byte
    return res.reshape(*x.shape[:-1], nb * Q80_BLOCK_BYTES)


def _roundf(v):
    """C roundf: nearest integer, halves away from zero (v - trunc(v) is exact)."""
    t = math.trunc(v)
    if abs(v - t) >= 0.5:
        t += 1 if v > 0 else -1
    return t


def dequantize_q80_ref(b):
    """Reference twin of dequantize_q80: per-block, per-element loops."""
    b = np.asarray(b, dtype=np.uint8)
    m = b.shape[-1]
    if m % Q80_BLOCK_BYTES:
        raise ValueError(f"Q8_0 row of {m} bytes is not a multiple of {Q80_BLOCK_BYTES}")
    nb = m // Q80_BLOCK_BYTES
    rows = b.reshape(-1, m)
    res = np.zeros((rows.shape[0], nb * BLOCK), dtype=np.float32)
    for r in range(rows.shape[0]):
        for i in range(nb):
            o = i * Q80_BLOCK_BYTES
            d = np.float32(np.frombuffer(rows[r, o:o + 2].tobytes(), dtype=_F16_LE)[0])
            for j in range(BLOCK):
                q = int(rows[r, o + 2 + j])
                q = q - 256 if q > 127 else q
                res[r, i * BLOCK + j] = d * np.float32(q)
    return res.reshape(*b.shape[:-1], nb * BLOCK)
