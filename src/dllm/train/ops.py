"""Backward passes of the Llama forward's ops: small pure functions, each beside its forward.

Every forward returns (output, saved) and its backward takes (d_output, saved) and returns
the gradients of the forward's inputs, in order. No autograd: the model (dllm.train.model)
calls them in reverse, so each gradient is a visible line. Shapes: N rows (tokens of the
batch, B*T), d the row width. The ops compute in the dtype they are given: float32 in
training (the forward kernels of dllm.kernels), float64 in the finite-difference tests (their
float64 reference twins, kernels.*_ref), so a gradient check is not drowned in rounding.
"""
import math

import numpy as np

from ..kernels import rmsnorm, rmsnorm_ref, rope, swiglu, swiglu_ref


def _float32(x):
    return np.asarray(x).dtype == np.float32


# --- embedding ----------------------------------------------------------------------------
def embedding_forward(table, ids):
    """table (vocab, d), ids (N,) int -> rows (N, d)."""
    return table[ids], ids


def embedding_backward(d_rows, ids, vocab_size):
    """d_rows (N, d) -> d_table (vocab, d): each row's gradient added to its token's row."""
    d_table = np.zeros((vocab_size, d_rows.shape[1]), dtype=d_rows.dtype)
    np.add.at(d_table, ids, d_rows)
    return d_table


# --- rmsnorm ------------------------------------------------------------------------------
def rmsnorm_forward(x, weight, eps):
    """x (N, d), weight (d,) -> y = x r weight with r = 1/sqrt(mean(x^2) + eps) per row."""
    y = rmsnorm(x, weight, eps) if _float32(x) else rmsnorm_ref(x, weight, eps)
    r = 1.0 / np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True) + eps)
    return y.astype(x.dtype, copy=False), (x, weight, r.astype(x.dtype, copy=False))


def rmsnorm_backward(dy, saved):
    """dy (N, d) -> (dx (N, d), d_weight (d,)).

    With g = dy weight: dx = r g - x r^3 mean(g x), since d r / d x = -r^3 x / d."""
    x, weight, r = saved
    g = dy * weight
    dx = r * g - x * (r ** 3) * np.mean(g * x, axis=-1, keepdims=True)
    d_weight = np.sum(dy * x * r, axis=0)
    return dx, d_weight


# --- matmul -------------------------------------------------------------------------------
def matmul_forward(x, w):
    """x (N, n), w (rows, n) stored [out, in] -> y = x w^T (N, rows)."""
    return x @ w.T, (x, w)


def matmul_backward(dy, saved):
    """dy (N, rows) -> (dx = dy w (N, n), dw = dy^T x (rows, n))."""
    x, w = saved
    return dy @ w, dy.T @ x


# --- RoPE ---------------------------------------------------------------------------------
def rope_forward(x, cos, sin):
    """x (B, T, heads, hd); cos, sin (T, hd/2) -> x with pairs (2i, 2i+1) rotated
    (kernels.rope on each sequence's (T, heads, hd) block)."""
    return np.stack([rope(seq, cos, sin) for seq in x]), (cos, sin)


def rope_backward(dy, saved):
    """A rotation's transpose is the rotation by minus the angle: dx = rope(dy, cos, -sin)."""
    cos, sin = saved
    return np.stack([rope(seq, cos, -sin) for seq in dy])


# --- causal grouped-query attention -------------------------------------------------------
def attention_forward(q, k, v):
    """Causal attention of whole sequences, query head h reading kv head h // g.

    q (B, T, H, hd), k and v (B, T, KV, hd), H = g KV -> (B, T, H*hd); saved holds the
    probabilities (B, KV, g, T, T) for the backward."""
    B, T, H, hd = q.shape
    KV = k.shape[2]
    g = H // KV
    qg = q.reshape(B, T, KV, g, hd).transpose(0, 2, 3, 1, 4)       # (B, KV, g, T, hd)
    kt = k.transpose(0, 2, 1, 3)[:, :, None]                        # (B, KV, 1, T, hd)
    vt = v.transpose(0, 2, 1, 3)[:, :, None]
    scale = 1.0 / math.sqrt(hd)
    scores = (qg @ kt.swapaxes(-1, -2)) * q.dtype.type(scale)      # (B, KV, g, T, T)
    scores[..., np.triu(np.ones((T, T), bool), k=1)] = -np.inf     # query t sees keys <= t
    scores -= scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    ctx = probs @ vt                                                # (B, KV, g, T, hd)
    out = ctx.transpose(0, 3, 1, 2, 4).reshape(B, T, H * hd)
    return out, (qg, kt, vt, probs, scale)


def attention_backward(d_out, saved):
    """d_out (B, T, H*hd) -> (dq (B, T, H, hd), dk, dv (B, T, KV, hd)).

    Softmax's backward: dS = P (dP - sum_j dP P); kv heads sum over the g query heads that
    read them."""
    qg, kt, vt, probs, scale = saved
    B, KV, g, T, hd = qg.shape
    d_ctx = d_out.reshape(B, T, KV, g, hd).transpose(0, 2, 3, 1, 4)
    dv = (probs.swapaxes(-1, -2) @ d_ctx).sum(axis=2)               # (B, KV, T, hd)
    dp = d_ctx @ vt.swapaxes(-1, -2)                                # (B, KV, g, T, T)
    ds = probs * (dp - np.sum(dp * probs, axis=-1, keepdims=True)) * qg.dtype.type(scale)
    dq = ds @ kt                                                    # (B, KV, g, T, hd)
    dk = (ds.swapaxes(-1, -2) @ qg).sum(axis=2)                     # (B, KV, T, hd)
    return (dq.transpose(0, 3, 1, 2, 4).reshape(B, T, KV * g, hd),
            dk.transpose(0, 2, 1, 3), dv.transpose(0, 2, 1, 3))


# --- SwiGLU -------------------------------------------------------------------------------
def swiglu_forward(gate, up):
    """gate, up (N, hidden) -> silu(gate) * up."""
    h = swiglu(gate, up) if _float32(gate) else swiglu_ref(gate, up)
    return h, (gate, up)


def swiglu_backward(dh, saved):
    """dh (N, hidden) -> (d_gate, d_up); silu'(a) = s (1 + a (1 - s)) with s = sigmoid(a)."""
    gate, up = saved
    s = 1.0 / (1.0 + np.exp(-gate))
    return dh * up * s * (1.0 + gate * (1.0 - s)), dh * gate * s


# --- classifier loss ----------------------------------------------------------------------
def cross_entropy_forward(logits, targets):
    """logits (N, vocab), targets (N,) int -> (sum over rows of -log softmax[target]) as a
    float64 scalar; saved holds the probabilities."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_z = np.log(np.sum(np.exp(shifted), axis=-1))
    rows = np.arange(len(targets))
    loss = float(np.sum(log_z - shifted[rows, targets], dtype=np.float64))
    probs = np.exp(shifted - log_z[:, None])
    return loss, (probs, targets)


def cross_entropy_backward(d_loss, saved):
    """d_loss (a scalar, the weight of the summed loss: 1/tokens for a mean) -> d_logits
    (N, vocab) = d_loss (softmax - onehot(target))."""
    probs, targets = saved
    d_logits = probs.copy()
    d_logits[np.arange(len(targets)), targets] -= 1
    d_logits *= probs.dtype.type(d_loss)
    return d_logits
