"""Every fast kernel against its slow, obvious reference twin."""
import numpy as np
import pytest

from dllm import kernels
from dllm.quant import quantize_q40


def rng(seed=0):
    return np.random.default_rng(seed)


@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("rows,n", [(7, 32), (33, 96), (300, 224)])
def test_matmul_q40_matches_reference(T, rows, n, monkeypatch):
    monkeypatch.setattr(kernels, "TILE_WEIGHTS", 64 * n)     # several tiles, a short last one
    w = rng(1).standard_normal((rows, n)).astype(np.float32)
    w[0, :32] = 0                                              # an all-zero block
    w_q40 = quantize_q40(w)
    x = rng(2).standard_normal((T, n)).astype(np.float32)
    fast, slow = kernels.matmul_q40(x, w_q40), kernels.matmul_q40_ref(x, w_q40)
    assert fast.shape == (T, rows) and fast.dtype == np.float32
    np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-5 * np.abs(slow).max())


def test_matmul_q40_rejects_mismatched_width():
    with pytest.raises(ValueError, match="input width"):
        kernels.matmul_q40(np.zeros((1, 64), np.float32), np.zeros((2, 18), np.uint8))


def test_matmul_tiles_crosses_tile_boundaries():
    w = rng().standard_normal((kernels.MIN_TILE_ROWS * 3 + 5, 64)).astype(np.float32)
    x = rng(1).standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_allclose(kernels.matmul_tiles(x, w, lambda t: t), x @ w.T, rtol=1e-5)


def test_rmsnorm_matches_reference():
    x = rng().standard_normal((4, 48)).astype(np.float32)
    weight = rng(1).standard_normal(48).astype(np.float32)
    np.testing.assert_allclose(kernels.rmsnorm(x, weight, 1e-5),
                               kernels.rmsnorm_ref(x, weight, 1e-5), rtol=1e-5, atol=1e-6)


def test_rope_matches_reference():
    x = rng().standard_normal((3, 2, 8)).astype(np.float32)
    cos, sin = kernels.rope_tables(8, 20, 10000.0)
    positions = [5, 6, 7]
    np.testing.assert_allclose(kernels.rope(x, cos[5:8], sin[5:8]),
                               kernels.rope_ref(x, positions, 10000.0), rtol=1e-5, atol=1e-5)


def test_swiglu_matches_reference():
    gate, up = rng().standard_normal((2, 2, 64)).astype(np.float32)
    np.testing.assert_allclose(kernels.swiglu(gate, up), kernels.swiglu_ref(gate, up),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head_kv", [[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 0], [0, 1, 2, 3]])
@pytest.mark.parametrize("pos,T", [(0, 1), (0, 6), (4, 3), (9, 1)])
def test_attention_matches_reference(head_kv, pos, T):
    """Uniform groups (one batched matmul) and uneven groups (a rank whose heads straddle
    kv heads) with a causal block at position 0 and later."""
    hd, kv = 8, max(head_kv) + 1
    q = rng().standard_normal((T, len(head_kv), hd)).astype(np.float32)
    k_cache = rng(1).standard_normal((kv, 16, hd)).astype(np.float32)
    v_cache = rng(2).standard_normal((kv, 16, hd)).astype(np.float32)
    fast = kernels.attention(q, k_cache, v_cache, pos, np.array(head_kv))
    np.testing.assert_allclose(fast, kernels.attention_ref(q, k_cache, v_cache, pos, head_kv),
                               rtol=1e-5, atol=1e-5)
