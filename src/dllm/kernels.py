"""Compute kernels: small pure functions over numpy arrays, each with a slow reference twin.

Shapes: T is the number of tokens in the block (T = 1 when decoding), n the input width.
All fast kernels compute in float32; the ``*_ref`` twins are written for obviousness (float64,
explicit loops) and exist to test the fast ones.
"""
import math

import numexpr
import numpy as np

from .quant import Q40_BLOCK_BYTES, dequantize_q40, quantize_q80

# Prefill: two Q4_0 code bytes read as one little-endian uint16 -> their four 4-bit codes
# minus 8: [low nibble of byte 0, its high nibble, low of byte 1, its high] = elements (j, j+16,
# j+1, j+17) of the block (GGML: low nibble = element j, high = element j+16). A 1 MB table:
# one lookup yields 4 weights, a quarter faster than a byte table yielding 2.
_CODE_PAIRS = np.arange(1 << 16)
_Q40_LUT16 = (np.stack([_CODE_PAIRS & 15, (_CODE_PAIRS >> 4) & 15, (_CODE_PAIRS >> 8) & 15,
                        _CODE_PAIRS >> 12], axis=1) - 8).astype(np.float32)

# Weights unpacked per step. Decoding: 3 * 2^16 weights, at least MIN_TILE_ROWS rows (each
# block's small gemv needs rows to amortize its call); the float32 copy of the tile's bytes
# (0.44 MB) stays in L2 and, with the rest of the call's scratch, adds < 0.035 bytes per
# weight to a 4096x4096 Q4_0 matrix's 0.5625 (docs/benchmarks.md). Prefill takes 16x taller
# tiles so that each BLAS gemm call has enough rows to reach its full rate.
TILE_WEIGHTS = 3 << 16
MIN_TILE_ROWS = 32
PREFILL_TILE_FACTOR = 16


def matmul_tiles(x, w_stored, dequantize):
    """x (T, n) float32 times a stored matrix (rows, ...) transposed -> (T, rows) float32, for
    any weight type: tiles of rows dequantized to float32 (`dequantize`, exact for every
    type of dllm.weight_types) into scratch, each multiplied by BLAS."""
    rows = w_stored.shape[0]
    T, n = x.shape
    tile = max(1, min(rows, max(MIN_TILE_ROWS, TILE_WEIGHTS // max(n, 1))))
    out = np.empty((T, rows), dtype=np.float32)
    for r0 in range(0, rows, tile):
        values = dequantize(w_stored[r0:r0 + tile])                  # (r, n) float32
        np.matmul(x, values.T, out=out[:, r0:r0 + len(values)])
    return out


def matmul_q40(x, w_q40):
    """x (T, n) float32 times a Q4_0 matrix (rows, n/32*18) uint8 transposed -> (T, rows) float32.

    The matrix stays Q4_0 in memory; tiles of rows are converted into one float32 scratch
    tile, reused. Decoding (T = 1) multiplies by the raw code bytes (see _gemv_q40); prefill
    (T > 1) dequantizes the tile by table lookup and calls BLAS gemm, which amortizes the
    unpacking over the T tokens.
    """
    T, n = x.shape
    rows, row_bytes = w_q40.shape
    nb = row_bytes // Q40_BLOCK_BYTES
    if nb * 32 != n:
        raise ValueError(f"input width {n} does not match a Q4_0 matrix of {nb} blocks per row")
    steps = TILE_WEIGHTS * (1 if T == 1 else PREFILL_TILE_FACTOR) // n
    tile = max(1, min(rows, max(MIN_TILE_ROWS, steps)))
    if T == 1:
        return _gemv_q40(np.asarray(x, np.float32).reshape(nb, 32), w_q40, tile)
    # The table yields each block's values in interleaved order (j, j+16, j+1, j+17, ...), so
    # x is permuted once to match instead of reordering weights.
    x_lanes = np.ascontiguousarray(
        x.reshape(T, nb, 2, 16).transpose(0, 1, 3, 2).reshape(T, n), dtype=np.float32)
    # Each 18-byte block is 9 uint16: the f16 scale, then 8 pairs of code bytes.
    words = w_q40.view(np.uint16).reshape(rows, nb, 9)
    codes, scales = words[:, :, 1:], words[:, :, 0].view(np.float16)
    scratch = np.empty((tile, nb, 8, 4), dtype=np.float32)
    out = np.empty((T, rows), dtype=np.float32)
    for r0 in range(0, rows, tile):
        r1 = min(r0 + tile, rows)
        values = np.take(_Q40_LUT16, codes[r0:r1], axis=0, mode="clip",
                         out=scratch[:r1 - r0]).reshape(r1 - r0, nb, 32)      # codes - 8
        values *= scales[r0:r1, :, None].astype(np.float32)
        np.matmul(x_lanes, values.reshape(r1 - r0, n).T, out=out[:, r0:r1])
    return out


def _gemv_q40(x_blocks, w_q40, tile):
    """Decode: (1, rows) = x W^T for x_blocks (nb, 32) and a Q4_0 matrix, by tiles of rows.

    Code byte j of a block holds c = lo + 16 hi, lo for element j and hi for element j+16, so
        lo x_j + hi x_{j+16} = c x_j + hi (x_{j+16} - 16 x_j),
    and a block's dot product is the raw bytes' dot product plus their high nibbles' (each cast
    to float32 whole, a contiguous pass without a lookup), minus 8 sum(x_block) for the codes'
    offset, times the block's scale. The 2 scale bytes that start each 18-byte block are cast
    too and meet zeros in x.
    """
    rows, row_bytes = w_q40.shape
    nb = len(x_blocks)
    x_planes = np.zeros((2, nb, Q40_BLOCK_BYTES, 1), dtype=np.float32)
    x_planes[0, :, 2:, 0] = x_blocks[:, :16]                               # times the bytes
    x_planes[1, :, 2:, 0] = x_blocks[:, 16:] - 16 * x_blocks[:, :16]       # times hi nibbles
    offsets = 8 * x_blocks.sum(axis=1, dtype=np.float32)[:, None, None]    # (nb, 1, 1)
    scratch = np.empty((tile, nb, Q40_BLOCK_BYTES), dtype=np.float32)
    out = np.empty((1, rows), dtype=np.float32)
    for r0 in range(0, rows, tile):
        raw = w_q40[r0:r0 + tile]                                          # (r, nb * 18) uint8
        plane = scratch[:len(raw)]
        flat = plane.reshape(len(raw), row_bytes)
        # (nb, r, 18) @ (nb, 18, 1): one small gemv per block column, batched by BLAS
        np.copyto(flat, raw, casting="unsafe")
        block_dots = np.matmul(plane.transpose(1, 0, 2), x_planes[0])
        np.right_shift(raw, 4, out=flat, casting="unsafe")
        block_dots += np.matmul(plane.transpose(1, 0, 2), x_planes[1])
        block_dots -= offsets
        scales = raw.view(np.uint16)[:, ::9].view(np.float16).astype(np.float32)  # (r, nb)
        np.einsum("bo,ob->o", block_dots[:, :, 0], scales, out=out[0, r0:r0 + len(raw)])
    return out


def matmul_q40_ref(x, w_q40):
    """Reference: dequantize the whole matrix, multiply in float64."""
    return (np.asarray(x, np.float64) @ dequantize_q40(w_q40).astype(np.float64).T).astype(np.float32)


def matmul_q40_q80_ref(x, w_q40):
    """Reference twin of GGML's Q4_0 x Q8_0 arithmetic (ggml_vec_dot_q4_0_q8_0), which the
    fast backend's decode kernel does: x (T, n) float32 is quantized to Q8_0 (bit-exact
    quantize_row_q8_0), each block's dot product of the 4-bit codes minus 8 and the 8-bit
    codes is an exact integer, scaled by both f16 scales; summed over blocks in float64.
    Returns (T, rows) float32."""
    rows, row_bytes = w_q40.shape
    nb = row_bytes // Q40_BLOCK_BYTES
    w_blocks = w_q40.reshape(rows, nb, Q40_BLOCK_BYTES)
    w_codes = np.concatenate([w_blocks[..., 2:] & 15, w_blocks[..., 2:] >> 4],
                             axis=-1).astype(np.int64) - 8                  # (rows, nb, 32)
    return _block_dots_ref(w_codes, _scales_ref(w_blocks), x)


def _scales_ref(blocks):
    """The f16 scales that start blocks (..., nb, bytes), as float64 (..., nb)."""
    return blocks[..., :2].copy().view("<f2")[..., 0].astype(np.float64)


def _block_dots_ref(w_codes, w_scales, x):
    """Sum over blocks of (integer codes of W) . (Q8_0 codes of x), each block's exact
    integer dot product times both scales, in float64. w_codes (rows, nb, 32) int64,
    w_scales (rows, nb); x (T, nb*32) float32 -> (T, rows) float32."""
    x_blocks = quantize_q80(np.asarray(x, np.float32)).reshape(len(x), w_codes.shape[1], 34)
    x_codes = x_blocks[..., 2:].view(np.int8).astype(np.int64)              # (T, nb, 32)
    block_dots = np.einsum("rbj,tbj->trb", w_codes, x_codes)               # exact integers
    return np.einsum("trb,rb,tb->tr", block_dots.astype(np.float64), w_scales,
                     _scales_ref(x_blocks)).astype(np.float32)


def matmul_q80_q80_ref(x, w_q80):
    """Reference twin of GGML's Q8_0 x Q8_0 arithmetic (ggml_vec_dot_q8_0_q8_0), which the
    fast backend's decode kernel does for Q8_0 weights: x quantized to Q8_0, exact integer
    block dot products scaled by both f16 scales, summed in float64. (T, rows) float32."""
    rows, row_bytes = w_q80.shape
    nb = row_bytes // 34
    w_blocks = w_q80.reshape(rows, nb, 34)
    w_codes = w_blocks[..., 2:].view(np.int8).astype(np.int64)               # (rows, nb, 32)
    return _block_dots_ref(w_codes, _scales_ref(w_blocks), x)


def rmsnorm(x, weight, eps):
    """x (T, d) float32, weight (d,) -> x / sqrt(mean(x^2) + eps) * weight, per row."""
    mean_square = np.mean(np.square(x), axis=-1, keepdims=True, dtype=np.float32)
    return (x * (np.float32(1.0) / np.sqrt(mean_square + np.float32(eps)))) * weight


def rmsnorm_ref(x, weight, eps):
    out = np.empty(x.shape, dtype=np.float64)
    for t, row in enumerate(np.asarray(x, np.float64)):
        out[t] = row / math.sqrt(sum(v * v for v in row) / len(row) + eps) * weight
    return out


def rope_tables(head_dim, max_seq_len, theta, scaling="none", factor=1.0, low_freq_factor=1.0,
                high_freq_factor=4.0, original_max_seq_len=8192):
    """cos and sin (max_seq_len, head_dim/2) float32 of pos * f_i, f_i = theta^(-2i/head_dim)
    rescaled as `scaling` says (ModelConfig.rope_scaling_args; see rope_frequencies)."""
    freqs = rope_frequencies(head_dim, theta, scaling, factor, low_freq_factor,
                             high_freq_factor, original_max_seq_len)
    angles = np.outer(np.arange(max_seq_len, dtype=np.float64), freqs)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rope_frequencies(head_dim, theta, scaling="none", factor=1.0, low_freq_factor=1.0,
                     high_freq_factor=4.0, original_max_seq_len=8192):
    """(head_dim/2,) float64 rotation frequencies theta^(-2i/head_dim), after scaling:
    "linear" divides all by factor; "llama3" (Llama 3.1, Meta's apply_scaling) divides those
    whose wavelength exceeds original_max_seq_len / low_freq_factor by factor, keeps those
    shorter than original_max_seq_len / high_freq_factor, and blends linearly in between."""
    freqs = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling == "linear":
        return freqs / factor
    if scaling == "llama3":
        wavelen = 2 * math.pi / freqs
        smooth = (original_max_seq_len / wavelen - low_freq_factor) / (high_freq_factor -
                                                                      low_freq_factor)
        blended = (1 - smooth) * freqs / factor + smooth * freqs
        return np.where(wavelen < original_max_seq_len / high_freq_factor, freqs,
                        np.where(wavelen > original_max_seq_len / low_freq_factor,
                                 freqs / factor, blended))
    return freqs


def rope(x, cos, sin):
    """Rotate interleaved pairs (2i, 2i+1) of every head (the GGML / llama2.c convention).

    x (T, heads, head_dim) float32; cos, sin (T, head_dim/2) rows of the block's positions.
    """
    even, odd = x[..., 0::2], x[..., 1::2]
    c, s = cos[:, None, :], sin[:, None, :]
    out = np.empty_like(x)
    out[..., 0::2] = even * c - odd * s
    out[..., 1::2] = even * s + odd * c
    return out


def rope_ref(x, positions, theta):
    out = np.array(x, dtype=np.float64)
    T, heads, hd = x.shape
    for t in range(T):
        for h in range(heads):
            for i in range(0, hd, 2):
                angle = positions[t] * theta ** (-i / hd)
                a, b = x[t, h, i], x[t, h, i + 1]
                out[t, h, i] = a * math.cos(angle) - b * math.sin(angle)
                out[t, h, i + 1] = a * math.sin(angle) + b * math.cos(angle)
    return out


def swiglu(gate, up):
    """silu(gate) * up, elementwise, float32 (the Llama FFN nonlinearity)."""
    return numexpr.evaluate("gate / (1 + exp(-gate)) * up").astype(np.float32, copy=False)


def swiglu_ref(gate, up):
    g = np.asarray(gate, np.float64)
    return g / (1 + np.exp(-g)) * up


def attention(q, k_cache, v_cache, pos, head_kv):
    """Causal attention of a block of T queries at positions pos..pos+T-1.

    q (T, H, hd) float32, this rank's query heads; k_cache, v_cache (KV, max_seq, hd) this
    rank's kv heads with positions [0, pos+T) filled; head_kv (H,) the cache index each query
    head reads (non-decreasing). Returns (T, H*hd) float32.
    """
    T, H, hd = q.shape
    S = pos + T
    # Query t may see keys 0..pos+t; larger positions are masked out.
    mask = np.arange(S)[None, :] > (pos + np.arange(T))[:, None]          # (T, S)
    out = np.empty((T, H, hd), dtype=np.float32)
    kv_ids, starts, counts = np.unique(head_kv, return_index=True, return_counts=True)
    if len(set(counts.tolist())) == 1:          # same number of heads per kv head: one batch
        groups = [(kv_ids[0], kv_ids[-1] + 1, 0, H)]
    else:
        groups = [(j, j + 1, a, a + c) for j, a, c in zip(kv_ids, starts, counts)]
    for k0, k1, h0, h1 in groups:
        nkv, g = k1 - k0, (h1 - h0) // (k1 - k0)
        qg = q[:, h0:h1].reshape(T, nkv, g, hd).transpose(1, 2, 0, 3).reshape(nkv, g * T, hd)
        scores = qg @ k_cache[k0:k1, :S].transpose(0, 2, 1)                 # (nkv, g*T, S)
        scores *= np.float32(1.0 / math.sqrt(hd))
        scores = scores.reshape(nkv, g, T, S)
        scores[:, :, mask] = -np.inf
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        ctx = scores.reshape(nkv, g * T, S) @ v_cache[k0:k1, :S]             # (nkv, g*T, hd)
        out[:, h0:h1] = ctx.reshape(nkv, g, T, hd).transpose(2, 0, 1, 3).reshape(T, h1 - h0, hd)
    return out.reshape(T, H * hd)


def attention_ref(q, k_cache, v_cache, pos, head_kv):
    T, H, hd = q.shape
    out = np.zeros((T, H, hd))
    for t in range(T):
        for h in range(H):
            keys = k_cache[head_kv[h], :pos + t + 1].astype(np.float64)
            scores = keys @ q[t, h] / math.sqrt(hd)
            weights = np.exp(scores - scores.max())
            weights /= weights.sum()
            out[t, h] = weights @ v_cache[head_kv[h], :pos + t + 1]
    return out.reshape(T, H * hd)
