"""The fast (numba) backend's kernels against their reference twins in dllm.kernels."""
import numpy as np
import pytest

from dllm import backend, kernels
from dllm.errors import DllmError
from dllm.quant import dequantize_q40, dequantize_q80, quantize_q40, quantize_q80

kf = pytest.importorskip("dllm.kernels_fast", reason="numba is not installed (dllm[fast])")
import numba  # noqa: E402  (installed: kernels_fast imported)


def rng(seed=0):
    return np.random.default_rng(seed)


def q40_matrix(rows, n, seed=1, scale=1.0):
    w = (scale * rng(seed).standard_normal((rows, n))).astype(np.float32)
    w[0, :32] = 0                                            # an all-zero block
    return quantize_q40(w)


def bound(x, w_q40):
    """Float64 sum of |terms| of each output: the scale of its float rounding error."""
    xd = np.abs(dequantize_q80(quantize_q80(x))).astype(np.float64)
    return xd @ np.abs(dequantize_q40(w_q40)).astype(np.float64).T


@pytest.mark.parametrize("rows", [1, 7, 8, 127, 128, 129, 300])
def test_pack_round_trip(rows):
    w_q40 = q40_matrix(rows, 96)
    packed = kf.pack_q40(w_q40)
    assert packed.shape == (rows, 96)
    assert packed.nbytes <= w_q40.nbytes + (kf.TAIL_ROWS - 1) * w_q40.shape[1]
    np.testing.assert_array_equal(kf.unpack_q40(packed), w_q40)


def test_input_quantization_is_bit_exact():
    x = rng(3).standard_normal((3, 160)).astype(np.float32)
    x[0, 32:64] = 0                                          # an all-zero block
    x[0, 64:96] = np.arange(32) - 15.5                       # codes exactly at halves
    xq = kf.Q80Input(x)
    for t in range(3):                                       # each row as if alone
        expected = quantize_q80(x[t:t + 1]).reshape(5, 34)
        np.testing.assert_array_equal(xq.codes[t].view(np.uint8), expected[:, 2:])
        np.testing.assert_array_equal(xq.scale[t], expected[:, :2].copy().view("<f2")[:, 0])
    lo, hi = xq.codes[..., :16].astype(np.int32), xq.codes[..., 16:].astype(np.int32)
    np.testing.assert_array_equal(xq.lo, lo)
    np.testing.assert_array_equal(xq.diff, hi - 16 * lo)
    np.testing.assert_array_equal(xq.offset, (-8 * (lo.sum(-1) + hi.sum(-1))).astype(np.int16))
    np.testing.assert_array_equal(xq.pairs.view(np.int8).reshape(3, 5, 16, 2),
                                  np.stack([lo, hi], -1))


def test_payload_quantizer_gives_the_bytes_of_quant_py():
    """The Q80 sync payload's compiled quantizer against quant.quantize_q80: zero blocks,
    halves, values beyond the f16 range of the scale (inf, as GGML) and subnormal scales."""
    x = rng(4).standard_normal((3, 192)).astype(np.float32)
    x[0, :32] = 0
    x[0, 32:64] = np.arange(32) - 15.5
    x[1, :32] *= 1e7
    x[1, 32:64] *= 1e-6
    x[2, 64:96] = -3.0
    np.testing.assert_array_equal(kf.quantize_q80(x), quantize_q80(x))


def test_f16_rounding_is_numpys():
    """The payload's scale rounding (float32 -> float16 bits in numba) against numpy's
    astype(float16) on a million random bit patterns and every 97th float32 from 2^-25
    (below the smallest f16 subnormal) to 2^17 (beyond the largest f16)."""
    bits = np.concatenate([rng(5).integers(0, 2 ** 32, 10 ** 6, dtype=np.uint64).astype(np.uint32),
                           np.arange(0x33000000, 0x48000000, 97, dtype=np.uint32)])
    values = bits.view(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        expected = values.astype(np.float16).view(np.uint16)
    got = np.empty_like(expected)

    @numba.njit
    def convert(bits, out):
        for i in range(len(bits)):
            out[i] = kf._f16_bits(bits[i])
    convert(bits, got)
    nan = np.isnan(values)
    np.testing.assert_array_equal(got[~nan], expected[~nan])
    assert np.isnan(got[nan].view(np.float16)).all()


@pytest.mark.parametrize("scale", [1e-9, 1e-6, 1e-3, 1.0, 1e4])
def test_input_from_the_payload_is_the_input_of_its_values(scale):
    """Q80Input.from_q80(bytes) against Q80Input of the bytes' float32 values: Q8_0 of Q8_0
    values gives back the same codes and scales wherever the f16 scale is not zero (where it
    is, every product with the block is zero either way), and the same products."""
    x = (scale * rng(6).standard_normal((3, 256))).astype(np.float32)
    x[0, :32] = 0
    x[1, 32:64] = np.arange(32) - 15.5
    payload = quantize_q80(x)
    np.testing.assert_array_equal(kf.dequantize_q80(payload), dequantize_q80(payload))
    again, direct = kf.Q80Input(dequantize_q80(payload)), kf.Q80Input.from_q80(payload)
    nonzero = direct.scale != 0
    for name in ("codes", "pairs", "lo", "diff"):
        np.testing.assert_array_equal(getattr(again, name)[nonzero], getattr(direct, name)[nonzero])
    np.testing.assert_array_equal(again.offset[nonzero], direct.offset[nonzero])
    np.testing.assert_array_equal(again.scale, direct.scale)
    np.testing.assert_array_equal(again.x, direct.x)
    w = kf.pack_q40(q40_matrix(200, 256))
    np.testing.assert_array_equal(kf.matmul(again, w), kf.matmul(direct, w))
    np.testing.assert_array_equal(kf.gemv_q40_q80(kf.Q80Input(again.x[:1]), w),
                                  kf.gemv_q40_q80(kf.Q80Input.from_q80(payload[:1]), w))


def test_float_steps_match_the_numpy_kernels():
    """The fast backend's rmsnorm, RoPE and SwiGLU against dllm.kernels' (float32 rounding)."""
    x = rng(7).standard_normal((3, 4, 64)).astype(np.float32)
    weight = rng(8).standard_normal(256).astype(np.float32)
    cos, sin = kernels.rope_tables(64, 8, 10000.0)
    np.testing.assert_allclose(kf.rmsnorm(x.reshape(3, 256), weight, 1e-5),
                               kernels.rmsnorm(x.reshape(3, 256), weight, 1e-5), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kf.rope(x, cos[2:5], sin[2:5]),
                               kernels.rope(x, cos[2:5], sin[2:5]), rtol=1e-6, atol=1e-6)
    gate, up = 8 * x.reshape(3, 256), x.reshape(3, 256)[::-1]
    np.testing.assert_allclose(kf.swiglu(gate, up), kernels.swiglu(gate, up), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows,n", [(1, 32), (7, 96), (130, 160), (300, 288), (256, 4128)])
@pytest.mark.parametrize("w_scale,x_scale", [(1.0, 1.0), (4e4, 1.0), (1e-6, 3e4), (1.0, 1e-6)])
def test_gemv_matches_integer_reference(rows, n, w_scale, x_scale):
    """Odd block counts, tails of groups, zero blocks, f16 scales near the top of their range
    (weights up to 8 x 4e4 / 8) and down to subnormals (x of 1e-6: its Q8_0 scale rounds to
    an f16 subnormal or to zero, as in GGML)."""
    w_q40 = q40_matrix(rows, n, scale=w_scale)
    x = (x_scale * rng(2).standard_normal((1, n))).astype(np.float32)
    x[0, -32:] = 0                                           # a zero input block
    fast = kf.gemv_q40_q80(kf.Q80Input(x), kf.pack_q40(w_q40))
    slow = kernels.matmul_q40_q80_ref(x, w_q40)
    assert fast.shape == (1, rows) and fast.dtype == np.float32
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-6 * bound(x, w_q40).max() + 1e-30)


def test_gemv_of_exact_integers_is_exact():
    """All codes at +-127 and scales of 1: every block sum is the worst case of the int16
    lanes (|sum| up to 32 * 8 * 127) and the result is exact."""
    n, rows = 64, 9
    blocks = np.zeros((rows, n // 32, 18), np.uint8)
    blocks[..., :2] = np.array([1.0], "<f2").view(np.uint8)    # scale 1
    blocks[..., 2:] = 0x00                                   # every code 0: value -8
    blocks[1, :, 2:] = 0xFF                                  # every code 15: value +7
    w_q40 = blocks.reshape(rows, -1)
    x = np.full((1, n), 127.0, np.float32)
    x[0, ::2] = -127.0
    x[0, :32] = 127.0
    fast = kf.gemv_q40_q80(kf.Q80Input(x), kf.pack_q40(w_q40))
    np.testing.assert_array_equal(fast, kernels.matmul_q40_q80_ref(x, w_q40))
    assert fast[0, 0] == -8 * 127 * 32


@pytest.mark.parametrize("T", [2, 5])
@pytest.mark.parametrize("rows,n", [(7, 32), (300, 224), (129, 96)])
def test_gemm_matches_reference(T, rows, n):
    """T > 1 rows: Q4_0 x Q8_0 by the C kernel (against the integer reference twin), or,
    without it, dequantized tiles times float32 inputs (against the float reference)."""
    w_q40 = q40_matrix(rows, n)
    x = rng(2).standard_normal((T, n)).astype(np.float32)
    fast = kf.matmul(kf.quantize_input(x), kf.pack_q40(w_q40))
    assert fast.shape == (T, rows) and fast.dtype == np.float32
    if kf.gemm_isa():
        slow = kernels.matmul_q40_q80_ref(x, w_q40)
        np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-6 * bound(x, w_q40).max())
    else:
        slow = kernels.matmul_q40_ref(x, w_q40)
        np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-5 * np.abs(slow).max())


needs_c = pytest.mark.skipif(kf.gemm_isa() is None,
                             reason="the C kernel dllm._gemm_q40_q80 is not built or no AVX2")


@needs_c
@pytest.mark.parametrize("rows,n", [(1, 32), (31, 96), (129, 160), (300, 4128), (512, 64)])
@pytest.mark.parametrize("w_scale,x_scale", [(1.0, 1.0), (4e4, 1.0), (1e-6, 3e4), (1.0, 1e-6)])
def test_c_gemm_rows_equal_decode_bit_for_bit(rows, n, w_scale, x_scale):
    """Every row of the C kernel's product is the decode kernel's of that row alone, bit for
    bit, and so is the C kernel's own T = 1 path (its decode loop): odd block counts, tail
    groups, tiles of 4 input rows and their remainder (T = 7), zero blocks and rows, f16
    scales at both ends of their range."""
    w = kf.pack_q40(q40_matrix(rows, n, scale=w_scale))
    x = (x_scale * rng(2).standard_normal((7, n))).astype(np.float32)
    x[3] = 0
    x[:, -32:] = 0
    both = kf.gemm_q40_q80(kf.Q80Input(x), w)
    for t in range(len(x)):
        alone = kf.gemv_q40_q80(kf.Q80Input(x[t:t + 1]), w)[0]
        assert np.array_equal(both[t], alone)
        assert np.array_equal(kf.gemm_q40_q80(kf.Q80Input(x[t:t + 1]), w)[0], alone)


@needs_c
def test_c_gemm_of_exact_integers_is_exact():
    """The int16 lanes' worst case (every code at 0 or 15, inputs at +-127) for T > 1."""
    n, rows = 64, 64
    blocks = np.zeros((rows, n // 32, 18), np.uint8)
    blocks[..., :2] = np.array([1.0], "<f2").view(np.uint8)
    blocks[1::2, :, 2:] = 0xFF
    w = kf.pack_q40(blocks.reshape(rows, -1))
    x = np.full((5, n), 127.0, np.float32)
    x[1] = -127.0
    out = kf.gemm_q40_q80(kf.Q80Input(x), w)
    np.testing.assert_array_equal(out[0, 0::2], -8 * 127 * n)
    np.testing.assert_array_equal(out[0, 1::2], 7 * 127 * n)
    np.testing.assert_array_equal(out[1], -out[0])


def test_without_the_c_kernel_prefill_runs_float(monkeypatch):
    monkeypatch.setenv("DLLM_GEMM", "numba")
    assert kf.gemm_isa() is None
    x = rng(2).standard_normal((3, 64)).astype(np.float32)
    assert kf.quantize_input(x) is x and isinstance(kf.quantize_input(x[:1]), kf.Q80Input)


@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("c_kernel", [False, True])
def test_threads_split_rows_without_changing_a_bit(T, c_kernel, monkeypatch):
    if c_kernel and kf.gemm_isa() is None:
        pytest.skip("the C kernel dllm._gemm_q40_q80 is not built or no AVX2")
    if not c_kernel:
        monkeypatch.setenv("DLLM_GEMM", "numba")
    w = kf.pack_q40(q40_matrix(1000, 96))
    x = kf.quantize_input(rng(2).standard_normal((T, 96)).astype(np.float32))
    one = kf.matmul(x, w, threads=1)
    kf.set_threads(2)
    try:
        np.testing.assert_array_equal(kf.matmul(x, w, threads=2), one)
    finally:
        kf.set_threads(1)


def test_f32_weights_keep_blas():
    w = rng().standard_normal((5, 64)).astype(np.float32)
    x = rng(1).standard_normal((1, 64)).astype(np.float32)
    fast = backend.make("fast", 1)
    np.testing.assert_allclose(fast.matmul(fast.quantize_input(x), fast.prepare(w, "f32")),
                               x @ w.T, rtol=1e-6)


def test_mismatched_width_is_refused():
    w = kf.pack_q40(q40_matrix(4, 64))
    for x in (np.zeros((1, 96), np.float32), np.zeros((3, 96), np.float32)):
        with pytest.raises(ValueError, match="input width"):
            kf.matmul(kf.quantize_input(x), w)


def test_backend_choice(monkeypatch):
    monkeypatch.delenv("DLLM_KERNELS", raising=False)
    assert backend.choose() == "fast"
    monkeypatch.setenv("DLLM_KERNELS", "numpy")
    assert backend.choose() == "numpy" and backend.choose("fast") == "fast"
    with pytest.raises(DllmError, match="--kernels must be one of"):
        backend.choose("cuda")
    monkeypatch.setattr(backend, "fast_available", lambda: False)
    monkeypatch.delenv("DLLM_KERNELS")
    assert backend.choose() == "numpy"
    with pytest.raises(DllmError, match=r"pip install 'dllm\[fast\]'"):
        backend.choose("fast")


@pytest.mark.parametrize("heads,kv_heads,pos,T", [(4, 2, 0, 5), (4, 4, 7, 1), (6, 3, 3, 9)])
def test_attention_matches_reference_and_every_row_is_as_if_alone(heads, kv_heads, pos, T):
    """The compiled attention against kernels.attention_ref, and each query row of a block
    bit for bit the row attended alone at its position (a prompt's numbers do not depend on
    how it is cut into blocks)."""
    hd, r = 32, rng(5)
    q = r.standard_normal((T, heads, hd)).astype(np.float32)
    k_cache = r.standard_normal((kv_heads, pos + T + 3, hd)).astype(np.float32)
    v_cache = r.standard_normal((kv_heads, pos + T + 3, hd)).astype(np.float32)
    head_kv = np.arange(heads) // (heads // kv_heads)
    block = kf.attention(q, k_cache, v_cache, pos, head_kv)
    np.testing.assert_allclose(block, kernels.attention_ref(q, k_cache, v_cache, pos, head_kv),
                               rtol=1e-5, atol=1e-5)
    for t in range(T):
        alone = kf.attention(q[t:t + 1], k_cache, v_cache, pos + t, head_kv)
        assert np.array_equal(block[t:t + 1], alone)


def test_prefer_huge_pages_keeps_the_array_and_its_values():
    """Best effort advice to the kernel: the same array, the same bytes, whatever the size
    or alignment (and a no-op where Linux's madvise is not there)."""
    for size in (100, 5 * kf.HUGE_PAGE + 12345):
        a = (np.arange(size) % 251).astype(np.uint8)
        view = a[7:]
        assert kf.prefer_huge_pages(view) is view
        np.testing.assert_array_equal(view, (np.arange(7, size) % 251).astype(np.uint8))
