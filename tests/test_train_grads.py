"""Gradient checks of dllm.train: every op's backward and the whole model's against float64
central finite differences, the training forward against tests/reference.py, and the
tensor-parallel gradients against the single-rank ones."""
import numpy as np
import pytest

from conftest import all_ranks
from dllm.comm import Comm
from dllm.config import ModelConfig
from dllm.kernels import rope_tables
from dllm.train import ops
from dllm.train.model import init_params, loss_and_grads, tensor_split
from reference import reference_logits

RNG = np.random.default_rng(7)
STEP = 1e-6          # central differences in float64: error ~ STEP^2, rounding ~ 1e-10/STEP
TOLERANCE = 1e-6     # relative, max over the checked entries


def numeric_grad(f, x, entries):
    """d f / d x at the given flat indices by central differences (x changed in place)."""
    flat, out = x.reshape(-1), []
    for i in entries:
        keep = flat[i]
        flat[i] = keep + STEP
        up = f()
        flat[i] = keep - STEP
        down = f()
        flat[i] = keep
        out.append((up - down) / (2 * STEP))
    return np.array(out)


def check(f, inputs, analytic, samples=None):
    """Each input's analytic gradient against finite differences of the scalar f()."""
    for x, g in zip(inputs, analytic):
        n = x.size
        entries = range(n) if samples is None or n <= samples else RNG.choice(n, samples, False)
        entries = list(entries)
        numeric = numeric_grad(f, x, entries)
        got = g.reshape(-1)[entries]
        scale = max(np.abs(numeric).max(), 1e-12)
        assert np.abs(got - numeric).max() / scale < TOLERANCE, (got, numeric)


def projection(shape):
    """A fixed random cotangent R: the checked scalar is sum(out * R)."""
    return RNG.standard_normal(shape)


def test_embedding():
    table, ids = RNG.standard_normal((7, 5)), np.array([3, 1, 3, 6, 0])
    R = projection((5, 5))
    d_table = ops.embedding_backward(R, ids, 7)
    check(lambda: np.sum(ops.embedding_forward(table, ids)[0] * R), [table], [d_table])


def test_rmsnorm():
    x, w = RNG.standard_normal((4, 12)), 1 + 0.1 * RNG.standard_normal(12)
    R = projection((4, 12))
    dx, dw = ops.rmsnorm_backward(R, ops.rmsnorm_forward(x, w, 1e-5)[1])
    check(lambda: np.sum(ops.rmsnorm_forward(x, w, 1e-5)[0] * R), [x, w], [dx, dw])


def test_matmul():
    x, w = RNG.standard_normal((3, 6)), RNG.standard_normal((5, 6))
    R = projection((3, 5))
    dx, dw = ops.matmul_backward(R, ops.matmul_forward(x, w)[1])
    check(lambda: np.sum(ops.matmul_forward(x, w)[0] * R), [x, w], [dx, dw])


def test_rope():
    x = RNG.standard_normal((2, 5, 3, 8))
    cos, sin = (t.astype(np.float64) for t in rope_tables(8, 5, 10000.0))
    R = projection(x.shape)
    dx = ops.rope_backward(R, (cos, sin))
    check(lambda: np.sum(ops.rope_forward(x, cos, sin)[0] * R), [x], [dx])


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_attention(heads, kv_heads):
    B, T, hd = 2, 5, 4
    q = RNG.standard_normal((B, T, heads, hd))
    k, v = RNG.standard_normal((B, T, kv_heads, hd)), RNG.standard_normal((B, T, kv_heads, hd))
    R = projection((B, T, heads * hd))
    dq, dk, dv = ops.attention_backward(R, ops.attention_forward(q, k, v)[1])
    check(lambda: np.sum(ops.attention_forward(q, k, v)[0] * R), [q, k, v], [dq, dk, dv])


def test_attention_is_causal_and_matches_the_inference_kernel():
    from dllm.kernels import attention
    q = RNG.standard_normal((1, 6, 4, 8)).astype(np.float32)
    k, v = (RNG.standard_normal((1, 6, 2, 8)).astype(np.float32) for _ in range(2))
    out = ops.attention_forward(q, k, v)[0][0]
    cache_k, cache_v = k[0].transpose(1, 0, 2), v[0].transpose(1, 0, 2)
    expected = attention(q[0], cache_k, cache_v, 0, np.array([0, 0, 1, 1]))
    assert np.abs(out - expected).max() < 1e-5


def test_swiglu():
    a, b = RNG.standard_normal((3, 7)) * 3, RNG.standard_normal((3, 7))
    R = projection((3, 7))
    da, db = ops.swiglu_backward(R, ops.swiglu_forward(a, b)[1])
    check(lambda: np.sum(ops.swiglu_forward(a, b)[0] * R), [a, b], [da, db])


def test_cross_entropy():
    logits, targets = RNG.standard_normal((6, 9)) * 2, np.array([0, 8, 3, 3, 1, 5])
    d = ops.cross_entropy_backward(0.25, ops.cross_entropy_forward(logits, targets)[1])
    check(lambda: 0.25 * ops.cross_entropy_forward(logits, targets)[0], [logits], [d])


TINY = {
    "gqa": ModelConfig(dim=32, hidden_dim=48, n_layers=2, n_heads=4, n_kv_heads=2,
                       vocab_size=24, max_seq_len=16),
    "tied": ModelConfig(dim=16, hidden_dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                        vocab_size=20, max_seq_len=16, tie_embeddings=True),
}


def float64_params(config, seed):
    params = init_params(config, np.random.default_rng(seed))
    rng = np.random.default_rng(seed + 1)
    # Larger than the 0.02 init, and norms away from 1, so every path carries gradient.
    return {k: (v.astype(np.float64) * (1 if v.ndim == 1 else 10)
                + (0.1 * rng.standard_normal(v.shape) if v.ndim == 1 else 0))
            for k, v in params.items()}


@pytest.mark.parametrize("name", sorted(TINY))
def test_whole_model_gradient_against_finite_differences(name):
    config = TINY[name]
    params = float64_params(config, 3)
    tokens = np.random.default_rng(4).integers(0, config.vocab_size, (2, 7))
    self_comm = Comm.self_comm()
    split = tensor_split(config, self_comm)
    d_loss = 1.0 / tokens[:, 1:].size
    _, grads = loss_and_grads(params, split, tokens, self_comm, d_loss)
    assert sorted(grads) == sorted(params)
    f = lambda: d_loss * loss_and_grads(params, split, tokens, self_comm, d_loss, grads=False)[0]
    names = sorted(params)
    check(f, [params[n] for n in names], [grads[n] for n in names], samples=4)


def test_training_forward_matches_the_reference_forward():
    config = TINY["gqa"]
    params = float64_params(config, 5)
    tokens = np.random.default_rng(6).integers(0, config.vocab_size, (1, 9))
    logits = reference_logits(params, config, tokens[0, :-1])
    shifted = logits - logits.max(axis=-1, keepdims=True)
    expected = -np.sum(shifted[np.arange(8), tokens[0, 1:]] - np.log(np.exp(shifted).sum(-1)))
    comm = Comm.self_comm()
    loss, _ = loss_and_grads(params, tensor_split(config, comm), tokens, comm, 1.0, grads=False)
    assert abs(loss - expected) < 1e-9 * abs(expected)


@pytest.mark.mpi
def test_tensor_parallel_gradients_equal_the_single_rank_ones(comm):
    """Every rank's gradient parts equal the matching parts of the one-rank gradient (to the
    float32 rounding of the logits' Allgather, whose payload is float32)."""
    config = ModelConfig(dim=64, hidden_dim=128, n_layers=2, n_heads=4, n_kv_heads=4,
                         vocab_size=40, max_seq_len=16)
    if config.n_kv_heads % comm.size:
        pytest.skip(f"{comm.size} ranks do not split {config.n_kv_heads} kv heads")
    full = float64_params(config, 8)
    tokens = np.random.default_rng(9).integers(0, config.vocab_size, (2, 6))
    self_comm = Comm.self_comm()
    loss1, g1 = loss_and_grads(full, tensor_split(config, self_comm), tokens, self_comm, 0.1)
    split = tensor_split(config, comm)
    local = {k: split.local(k, v) for k, v in full.items()}
    loss, g = loss_and_grads(local, split, tokens, comm, 0.1)
    worst = max(np.abs(g[k] - split.local(k, g1[k])).max() / np.abs(g1[k]).max() for k in g)
    assert all_ranks(abs(loss - loss1) < 1e-6 * loss1 and worst < 1e-5), (loss, loss1, worst)
