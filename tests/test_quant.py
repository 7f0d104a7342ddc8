"""Q4_0 / Q8_0: fast vs reference twins, vs gguf-py, literal golden bytes, error bounds."""
import numpy as np
import pytest

from dllm.quant import (
    BLOCK,
    Q40_BLOCK_BYTES,
    Q80_BLOCK_BYTES,
    dequantize_q40,
    dequantize_q40_ref,
    dequantize_q80,
    dequantize_q80_ref,
    q40_row_bytes,
    q80_row_bytes,
    quantize_q40,
    quantize_q40_ref,
    quantize_q80,
    quantize_q80_ref,
)

KINDS = {
    "q40": (quantize_q40, quantize_q40_ref, dequantize_q40, dequantize_q40_ref, Q40_BLOCK_BYTES),
    "q80": (quantize_q80, quantize_q80_ref, dequantize_q80, dequantize_q80_ref, Q80_BLOCK_BYTES),
}


def f16_scales(b, block_bytes):
    """The float16 scale of each block of byte rows b (..., nb*block_bytes), float32 (..., nb)."""
    blocks = b.reshape(*b.shape[:-1], -1, block_bytes)
    return np.ascontiguousarray(blocks[..., :2]).view("<f2")[..., 0].astype(np.float32)


def random_blocks(rng, shape):
    """Gaussian values with a per-block magnitude spread over 1e-3..1e3."""
    n = shape[-1]
    x = rng.standard_normal(shape).astype(np.float32)
    scale = 10.0 ** rng.uniform(-3, 3, size=(*shape[:-1], n // BLOCK, 1))
    return (x.reshape(*shape[:-1], n // BLOCK, BLOCK) * scale).reshape(shape).astype(np.float32)


def edge_blocks():
    """One row of hand-picked blocks: zeros, ties, exact halves, subnormal and huge scales."""
    blocks = []
    z = np.zeros(BLOCK, np.float32)
    blocks.append(z.copy())  # all zero
    blocks.append(-z)  # all -0.0: C keeps max = +0.0f, so Q4_0 d = -0.0
    t = np.linspace(-1, 1, BLOCK).astype(np.float32)
    t[3], t[20] = 2.0, -2.0  # tie, positive first -> Q4_0 d < 0
    blocks.append(t.copy())
    t[3], t[20] = -2.0, 2.0  # tie, negative first -> Q4_0 d > 0
    blocks.append(t.copy())
    t = np.full(BLOCK, 0.25, np.float32)
    t[0], t[31] = -3.0, -3.0  # tie with itself, same sign
    blocks.append(t)
    # amax 127 -> d = 1, id = 1: Q8_0 rounding sees exact halves and the 0.49999997 trap
    h = np.zeros(BLOCK, np.float32)
    h[:12] = [127, 2.5, -2.5, 0.5, -0.5, 0.49999997, -0.49999997, 1.5, -1.5,
              126.5, -126.5, 3.4999998]
    blocks.append(h)
    # max -8 -> Q4_0 d = 1, id = 1: x*id + 8.5 lands on exact integers and halves
    q = np.arange(BLOCK, dtype=np.float32) / 2 - 8
    blocks.append(q)
    blocks.append(-q)
    rng = np.random.default_rng(7)
    for mag in (1e-7, 3e-6, 1e-5, 2e-4, 1e-3, 1e-9, 1e-12):  # f16-subnormal or flushed scales
        blocks.append((rng.standard_normal(BLOCK) * mag).astype(np.float32))
    big = (rng.uniform(-1, 1, BLOCK) * 60000 * 8).astype(np.float32)
    big[5] = 60000 * 8
    blocks.append(big)  # Q4_0 d = -60000, near the f16 limit
    big = big.copy()
    big[5] = 70000 * 8
    blocks.append(big)  # Q4_0 d = -70000: f16 overflow -> -inf (Q8_0 d stays finite)
    # x*id is a tie only after float32 rounding (4.5 for Q4_0, -91.5 for Q8_0); in float64
    # it falls just short, so these pin float32 arithmetic.
    for pair in ([2.9404218196868896, -1.653987169265747],
                 [2.2424542903900146, -1.6156264543533325]):
        p = np.zeros(BLOCK, np.float32)
        p[:2] = pair
        blocks.append(p)
    return np.concatenate(blocks).astype(np.float32)


# ------------------------------------------------------------------------------------------
# fast == reference twin
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("shape", [(7 * BLOCK,), (3, 5 * BLOCK), (2, 3, 3 * BLOCK)])
def test_fast_matches_ref_random(kind, shape):
    quant, quant_ref, deq, deq_ref, bb = KINDS[kind]
    rng = np.random.default_rng(sum(shape))
    x = random_blocks(rng, shape)
    x.reshape(-1, BLOCK)[1] = 0.0  # an all-zero block forced in
    b = quant(x)
    assert b.dtype == np.uint8 and b.shape == (*shape[:-1], shape[-1] // BLOCK * bb)
    np.testing.assert_array_equal(b, quant_ref(x))
    y = deq(b)
    assert y.dtype == np.float32 and y.shape == shape
    np.testing.assert_array_equal(y, deq_ref(b))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_fast_matches_ref_edge_blocks(kind):
    quant, quant_ref, deq, deq_ref, _ = KINDS[kind]
    x = edge_blocks()
    b = quant(x)
    np.testing.assert_array_equal(b, quant_ref(x))
    with np.errstate(invalid="ignore"):  # the f16-overflow block dequantizes inf * 0
        np.testing.assert_array_equal(deq(b), deq_ref(b))
    # Every byte pattern dequantizes the same way: random bytes with finite scales.
    rng = np.random.default_rng(3)
    r = rng.integers(0, 256, size=(2, 5 * KINDS[kind][4]), dtype=np.uint8)
    for blk in r.reshape(-1, KINDS[kind][4]):
        blk[:2] = np.frombuffer(np.float16(rng.standard_normal()).tobytes(), np.uint8)
    np.testing.assert_array_equal(deq(r), deq_ref(r))


def test_q40_ties_first_occurrence_wins():
    x = edge_blocks()
    d = f16_scales(quantize_q40(x), Q40_BLOCK_BYTES)
    assert d[2] == -0.25 and d[3] == 0.25  # max = +2 -> d = 2/-8; max = -2 -> d = -2/-8
    assert d[4] == 0.375  # max = -3
    assert np.signbit(d[0]) and np.signbit(d[1])  # d = +0.0f / -8 = -0.0 for any zero block
    assert d[6] == 1.0 and d[7] == -1.0


def test_q80_halves_round_away_from_zero():
    x = edge_blocks()[5 * BLOCK:6 * BLOCK]
    b = quantize_q80(x)
    assert f16_scales(b, Q80_BLOCK_BYTES)[0] == 1.0
    q = b[2:].view(np.int8)
    assert q[:12].tolist() == [127, 3, -3, 1, -1, 0, 0, 2, -2, 127, -127, 3]


def test_float32_products():
    x = edge_blocks()
    # element 1 of each block: byte 3 (after the 2 scale bytes; Q4_0 low nibble)
    assert quantize_q40(x[17 * BLOCK:18 * BLOCK])[3] & 0x0F == 13  # trunc(4.5f + 8.5f), not 12
    assert quantize_q80(x[18 * BLOCK:19 * BLOCK])[3:4].view(np.int8)[0] == -92  # roundf(-91.5f)


def test_tiny_and_huge_scales():
    x = edge_blocks()
    d4 = f16_scales(quantize_q40(x), Q40_BLOCK_BYTES)
    d8 = f16_scales(quantize_q80(x), Q80_BLOCK_BYTES)
    tiny = np.finfo(np.float16).smallest_normal
    # blocks 8..14: magnitudes 1e-7 .. 1e-3, 1e-9, 1e-12
    assert any(0 < abs(v) < tiny for v in d4[8:13])  # f16 subnormal scales occur
    assert any(0 < abs(v) < tiny for v in d8[8:13])
    assert d4[13] == 0 and d4[14] == 0 and d8[13] == 0 and d8[14] == 0  # flushed to zero
    assert d4[15] == -60000.0
    assert np.isneginf(d4[16]) and np.isfinite(d8[16])


# ------------------------------------------------------------------------------------------
# gguf-py as an independent implementation
# ------------------------------------------------------------------------------------------

def _gguf():
    return pytest.importorskip(
        "gguf", reason="gguf-py not installed: no independent Q4_0/Q8_0 implementation to check")


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # gguf's f16 cast
@pytest.mark.parametrize("kind, qname", [("q40", "Q4_0"), ("q80", "Q8_0")])
def test_matches_gguf(kind, qname):
    gguf = _gguf()
    qtype = getattr(gguf.GGMLQuantizationType, qname)
    quant, _, deq, _, _ = KINDS[kind]
    rng = np.random.default_rng(11)
    x = random_blocks(rng, (33, 31 * BLOCK))
    edges = edge_blocks()
    # gguf keeps a leading -0.0 as the Q4_0 max where C keeps +0.0; that block is checked
    # against the C semantics in test_q40_ties_first_occurrence_wins instead.
    edges = np.concatenate([edges[:BLOCK], edges[2 * BLOCK:]])
    for arr in (x, edges, x[3:5]):
        b = quant(arr)
        g = np.asarray(gguf.quants.quantize(arr, qtype))
        assert g.dtype == np.uint8
        np.testing.assert_array_equal(b, g)
    b = quant(x)
    np.testing.assert_array_equal(deq(b), np.asarray(gguf.quants.dequantize(b, qtype)))


# ------------------------------------------------------------------------------------------
# literal golden bytes: pin the layout (f16 scale first; low nibble j, high nibble j+16)
# ------------------------------------------------------------------------------------------

# x = [-16 .. 15]: max = -16 (first), d = 2.0 (f16 0x4000), id = 0.5, code = trunc(x/2 + 8.5)
# -> elements 0..15: 0 1 1 2 2 3 3 4 4 5 5 6 6 7 7 8, elements 16..31: 8 9 9 .. 15 15 15.
GOLDEN_Q40_A = bytes.fromhex("0040" "80 91 91 a2 a2 b3 b3 c4 c4 d5 d5 e6 e6 f7 f7 f8")
# x = [-15 .. 16]: max = +16, d = -2.0 (f16 0xc000), id = -0.5.
GOLDEN_Q40_B = bytes.fromhex("00c0" "8f 7f 7f 6e 6e 5d 5d 4c 4c 3b 3b 2a 2a 19 19 08")
# d = 1.0 (f16 0x3c00), codes int8 as two's complement bytes.
GOLDEN_Q80_X = [127, -127, 2.5, -2.5, 0.5, -0.5, 0.49999997, 1.5] + [0] * 24
GOLDEN_Q80 = bytes.fromhex("003c" "7f 81 03 fd 01 ff 00 02" + "00" * 24)


def golden_cases():
    a = np.arange(BLOCK, dtype=np.float32) - 16
    return [
        (quantize_q40, dequantize_q40, a, GOLDEN_Q40_A),
        (quantize_q40, dequantize_q40, a + 1, GOLDEN_Q40_B),
        (quantize_q80, dequantize_q80, np.array(GOLDEN_Q80_X, np.float32), GOLDEN_Q80),
    ]


@pytest.mark.parametrize("case", range(3))
def test_golden_bytes(case):
    quant, deq, x, golden = golden_cases()[case]
    assert quant(x).tobytes() == golden
    # Two rows of the same block: each row's bytes are its blocks back to back.
    assert quant(np.stack([x, x])).tobytes() == golden * 2
    # Dequantizing the literal bytes gives d * code.
    y = deq(np.frombuffer(golden, np.uint8))
    assert y.dtype == np.float32 and y.shape == (BLOCK,)


def test_golden_dequantize_values():
    y = dequantize_q40(np.frombuffer(GOLDEN_Q40_A, np.uint8))
    codes = [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12,
             13, 13, 14, 14, 15, 15, 15]
    assert y.tolist() == [2.0 * (c - 8) for c in codes]
    y = dequantize_q80(np.frombuffer(GOLDEN_Q80, np.uint8))
    assert y[:8].tolist() == [127, -127, 3, -3, 1, -1, 0, 2]


def test_golden_bytes_match_gguf():
    gguf = _gguf()
    for (quant, _, x, golden), q in zip(golden_cases(), ["Q4_0", "Q4_0", "Q8_0"]):
        g = gguf.quants.quantize(x, getattr(gguf.GGMLQuantizationType, q))
        assert np.asarray(g).tobytes() == golden


# ------------------------------------------------------------------------------------------
# round-trip error bounds
# ------------------------------------------------------------------------------------------

def test_round_trip_error_bounds():
    rng = np.random.default_rng(5)
    x = np.concatenate([random_blocks(rng, (4, 64 * BLOCK)).reshape(-1),
                        edge_blocks()[:16 * BLOCK]]).astype(np.float32)
    xb = x.reshape(-1, BLOCK).astype(np.float64)
    amax = np.abs(xb).max(axis=1)

    # Q8_0: |err| <= d/2 in code units; the f16 rounding of d adds at most 127 * |d32 - d16|.
    b = quantize_q80(x)
    d16 = f16_scales(b, Q80_BLOCK_BYTES).astype(np.float64)
    d32 = (amax.astype(np.float32) / np.float32(127)).astype(np.float64)
    err = np.abs(dequantize_q80(b).reshape(-1, BLOCK) - xb).max(axis=1)
    bound = 0.5 * d32 * (1 + 1e-6) + 127 * np.abs(d32 - d16) + 1e-30
    assert np.all(err <= bound)

    # Q4_0: |err| <= |d| (half a step, or a whole one where the top code is clamped to 15);
    # the f16 rounding of d adds at most 8 * |d32 - d16|.
    b = quantize_q40(x)
    d16 = f16_scales(b, Q40_BLOCK_BYTES).astype(np.float64)
    d32 = (amax.astype(np.float32) / np.float32(8)).astype(np.float64)
    err = np.abs(dequantize_q40(b).reshape(-1, BLOCK) - xb).max(axis=1)
    bound = d32 * (1 + 1e-6) + 8 * np.abs(np.abs(d16) - d32) + 1e-30
    assert np.all(err <= bound)


# ------------------------------------------------------------------------------------------
# shapes, views, out=, errors
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(KINDS))
def test_views_and_out(kind):
    quant, _, deq, _, bb = KINDS[kind]
    rng = np.random.default_rng(9)
    x = random_blocks(rng, (6, 8 * BLOCK))
    b = quant(x)
    y = deq(b)
    # row slices, strided rows, column (block) slices, non-contiguous quantize input
    np.testing.assert_array_equal(deq(b[2:5]), y[2:5])
    np.testing.assert_array_equal(deq(b[::2]), y[::2])
    np.testing.assert_array_equal(deq(b[:, bb:3 * bb]), y[:, BLOCK:3 * BLOCK])
    np.testing.assert_array_equal(deq(np.asfortranarray(b)), y)
    np.testing.assert_array_equal(quant(x[:, BLOCK:3 * BLOCK]), b[:, bb:3 * bb])
    np.testing.assert_array_equal(quant(x[::2]), b[::2])
    np.testing.assert_array_equal(deq(b.reshape(-1)), y.reshape(-1))
    np.testing.assert_array_equal(deq(b[0].tobytes()), y[0])
    np.testing.assert_array_equal(deq(b.view(np.int8)), y)
    # out=: contiguous, and a column slice of a wider array (not reshapeable in place)
    out = np.full(y.shape, np.nan, np.float32)
    assert deq(b, out=out) is out
    np.testing.assert_array_equal(out, y)
    wide = np.full((6, 10 * BLOCK), np.nan, np.float32)
    deq(b, out=wide[:, BLOCK:9 * BLOCK])
    np.testing.assert_array_equal(wide[:, BLOCK:9 * BLOCK], y)
    assert np.isnan(wide[:, :BLOCK]).all() and np.isnan(wide[:, 9 * BLOCK:]).all()
    with pytest.raises(ValueError):
        deq(b, out=np.empty((6, 7 * BLOCK), np.float32))
    with pytest.raises(TypeError):
        deq(b, out=np.empty(y.shape, np.float64))
    # empty rows
    assert quant(np.zeros((3, 0), np.float32)).shape == (3, 0)
    assert deq(np.zeros((3, 0), np.uint8)).shape == (3, 0)


@pytest.mark.parametrize("chunk", [None, 7])
def test_dequantize_q40_chunks(monkeypatch, chunk):
    # Q4_0 dequantizes in chunks of blocks; a small chunk (7 does not divide 12000 blocks)
    # exercises the boundaries and the short last chunk.
    if chunk is not None:
        import dllm.quant
        monkeypatch.setattr(dllm.quant, "_DEQ_CHUNK_BLOCKS", chunk)
    rng = np.random.default_rng(13)
    b = rng.integers(0, 256, size=(40, 300 * Q40_BLOCK_BYTES), dtype=np.uint8)
    b.reshape(-1, Q40_BLOCK_BYTES)[:, :2] = np.frombuffer(
        rng.standard_normal(40 * 300).astype("<f2").tobytes(), np.uint8).reshape(-1, 2)
    blocks = b.reshape(-1, Q40_BLOCK_BYTES)
    d = np.ascontiguousarray(blocks[:, :2]).view("<f2").astype(np.float32)
    qs = blocks[:, 2:].astype(np.int32)
    want = np.concatenate([(qs & 15) - 8, (qs >> 4) - 8], axis=1).astype(np.float32) * d
    np.testing.assert_array_equal(dequantize_q40(b), want.reshape(40, 300 * BLOCK))


def test_row_bytes_and_bad_lengths():
    assert q40_row_bytes(4096) == 4096 // 32 * 18 and q80_row_bytes(4096) == 4096 // 32 * 34
    assert q40_row_bytes(0) == 0
    for bad in (33, 31, 48, -32):
        for f in (q40_row_bytes, q80_row_bytes):
            with pytest.raises(ValueError, match=str(bad)):
                f(bad)
    for quant, quant_ref in ((quantize_q40, quantize_q40_ref), (quantize_q80, quantize_q80_ref)):
        for f in (quant, quant_ref):
            with pytest.raises(ValueError, match="n=40"):
                f(np.zeros((2, 40), np.float32))
    for deq, deq_ref, bb in ((dequantize_q40, dequantize_q40_ref, Q40_BLOCK_BYTES),
                             (dequantize_q80, dequantize_q80_ref, Q80_BLOCK_BYTES)):
        for f in (deq, deq_ref):
            with pytest.raises(ValueError, match=str(bb + 1)):
                f(np.zeros((2, bb + 1), np.uint8))
