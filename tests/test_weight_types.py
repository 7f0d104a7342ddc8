"""The weight-type table (dllm.weight_types): byte layouts, round trips, non-finite checks,
and every type's matmul kernels against the float product of its dequantized weights."""
import numpy as np
import pytest

from dllm import backend, kernels
from dllm.weight_types import NAMES, TYPES, Matrix, describe_types, dequantize_bf16, quantize_bf16


def rng(seed=0):
    return np.random.default_rng(seed)


def test_table_states_bytes_per_weight():
    assert {n: t.bytes_per_weight for n, t in TYPES.items()} == {
        "q40": 0.5625, "q80": 1.0625, "bf16": 2, "f16": 2, "f32": 4}
    for t in TYPES.values():
        stored = t.quantize(np.zeros((3, 64), np.float32))
        assert stored.dtype == t.dtype and stored.shape == t.stored_shape((3, 64))
        assert stored.nbytes == t.nbytes(3, 64)


def test_bf16_rounds_to_nearest_even_and_keeps_nan_quiet():
    bits = np.array([0x3F808000, 0x3F818000, 0x3F807FFF, 0x7FC00001, 0xFF800000, 0x7F7FFFFF],
                    np.uint32)
    got = quantize_bf16(bits.view(np.float32))
    # a tie rounds to the even neighbour (0x3F80, 0x3F82), below a tie down, NaN stays NaN,
    # -inf stays -inf, the largest float rounds up to inf as GGML does
    assert got.tolist() == [0x3F80, 0x3F82, 0x3F80, 0x7FC0, 0xFF80, 0x7F80]
    x = rng().standard_normal(1000).astype(np.float32)
    back = dequantize_bf16(quantize_bf16(x))
    assert np.all(np.abs(back - x) <= np.abs(x) * 2.0 ** -8)
    assert np.array_equal(dequantize_bf16(quantize_bf16(back)), back)   # exact once rounded


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_error_and_nonfinite(name):
    t = TYPES[name]
    x = rng().standard_normal((4, 64)).astype(np.float32)
    back = t.dequantize(t.quantize(x))
    bound = {"q40": 0.2, "q80": 0.02, "bf16": 2 ** -8, "f16": 2 ** -11, "f32": 0}[name]
    assert np.abs(back - x).max() <= bound * np.abs(x).max() + 1e-12
    assert t.nonfinite(t.quantize(x)) == 0
    if t.block == 1:   # a float type keeps NaN (block types: GGML leaves its codes unspecified)
        x[1, 5] = np.nan
        assert t.nonfinite(t.quantize(x)) == 1
    else:              # a block type's NaN shows in its scale
        stored = t.quantize(np.ones((1, 64), np.float32))
        stored[0, :2] = np.frombuffer(np.float16(np.inf).tobytes(), np.uint8)
        assert t.nonfinite(stored) == 1


@pytest.mark.parametrize("kernel_name", backend.KERNELS)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("T", [1, 3])
def test_every_type_multiplies_like_its_dequantized_weights(kernel_name, name, T):
    if kernel_name == "fast" and not backend.fast_available():
        pytest.skip("the fast kernels need numba: pip install 'dllm[fast]'")
    t = TYPES[name]
    stored = t.quantize(rng().standard_normal((133, 96)).astype(np.float32))
    x = rng(1).standard_normal((T, 96)).astype(np.float32)
    expected = x.astype(np.float64) @ t.dequantize(stored).astype(np.float64).T
    k = backend.make(kernel_name, 1)
    got = k.matmul(k.quantize_input(x), k.prepare(stored.copy(), name))
    assert got.shape == (T, 133) and got.dtype == np.float32
    # Q8_0 inputs (the fast backend's decode of q40 / q80, and q40's T > 1 rows where the C
    # kernel runs) round x to 8 bits per block
    q8_input = kernel_name == "fast" and name in ("q40", "q80") and (
        T == 1 or (name == "q40" and k.gemm != "blas"))
    tol = 2e-2 if q8_input else 1e-5
    assert np.abs(got - expected).max() <= tol * np.abs(expected).max()
    assert np.array_equal(k.stored(k.prepare(stored.copy(), name)), stored)


def test_q80_q80_reference_twin_is_exact_integer_arithmetic():
    w = TYPES["q80"].quantize(rng().standard_normal((7, 64)).astype(np.float32))
    x = rng(1).standard_normal((1, 64)).astype(np.float32)
    ref = kernels.matmul_q80_q80_ref(x, w)
    xq = TYPES["q80"].dequantize(TYPES["q80"].quantize(x)).astype(np.float64)
    np.testing.assert_allclose(ref, xq @ TYPES["q80"].dequantize(w).astype(np.float64).T,
                               rtol=1e-6)
    if backend.fast_available():
        from dllm import kernels_fast
        got = kernels_fast.gemv_q80_q80(kernels_fast.quantize_input(x), w)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_matrix_knows_its_logical_shape_and_rows():
    stored = TYPES["q80"].quantize(np.arange(2 * 64, dtype=np.float32).reshape(2, 64) / 100)
    m = Matrix(stored, TYPES["q80"])
    assert m.shape == (2, 64)
    np.testing.assert_allclose(m.rows(np.array([1])), TYPES["q80"].dequantize(stored[1:]))


def test_describe_types_names_the_exceptions():
    types = {f"layers/{i}/{n}": "q40" for i in range(2) for n in ("wq", "w1")}
    types.update({"tok_embeddings": "f32", "output": "q80", "norm": "f32"})
    assert describe_types(types) == "q40, output q80, tok_embeddings f32"
    assert describe_types({"layers/0/wq": "f16", "norm": "f32"}) == "f16"
