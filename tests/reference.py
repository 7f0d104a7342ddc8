"""An independent float64 Llama forward for tests: shares no code with dllm's kernels.

RoPE is written with complex numbers (as Meta's reference model does), attention with
repeated kv heads and einsum, so a mistake in dllm's interleaving, grouping or masking shows.
weights: dict of float arrays by dllm name ("layers/0/wq", ...), logical shapes [out, in].
rope_style: "interleaved" (pairs 2i, 2i+1; llama2.c/GGML) or "half" (HF rotate-half).
"""
import numpy as np


def _rmsnorm(x, weight, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def _rope(v, positions, theta, style):
    T, H, hd = v.shape
    freqs = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    rot = np.exp(1j * np.outer(positions, freqs))[:, None, :]          # (T, 1, hd/2)
    if style == "interleaved":
        z = (v[..., 0::2] + 1j * v[..., 1::2]) * rot
        out = np.empty_like(v)
        out[..., 0::2], out[..., 1::2] = z.real, z.imag
        return out
    z = (v[..., :hd // 2] + 1j * v[..., hd // 2:]) * rot
    return np.concatenate([z.real, z.imag], axis=-1)


def reference_logits(weights, cfg, tokens, rope_style="interleaved"):
    """(T, vocab) float64 logits of tokens at positions 0..T-1. cfg: dllm ModelConfig."""
    w = {k: np.asarray(v, np.float64) for k, v in weights.items()}
    T, hd = len(tokens), cfg.dim // cfg.n_heads
    group = cfg.n_heads // cfg.n_kv_heads
    positions = np.arange(T)
    x = w["tok_embeddings"][np.asarray(tokens)]
    causal = np.triu(np.ones((T, T), bool), k=1)
    for i in range(cfg.n_layers):
        p = f"layers/{i}/"
        h = _rmsnorm(x, w[p + "attention_norm"], cfg.norm_eps)
        q = _rope((h @ w[p + "wq"].T).reshape(T, cfg.n_heads, hd), positions, cfg.rope_theta, rope_style)
        k = _rope((h @ w[p + "wk"].T).reshape(T, cfg.n_kv_heads, hd), positions, cfg.rope_theta, rope_style)
        v = (h @ w[p + "wv"].T).reshape(T, cfg.n_kv_heads, hd)
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
        scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd)
        scores[:, causal] = -np.inf
        probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", probs, v).reshape(T, cfg.dim) @ w[p + "wo"].T
        h = _rmsnorm(x, w[p + "ffn_norm"], cfg.norm_eps)
        gate = h @ w[p + "w1"].T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ w[p + "w3"].T)) @ w[p + "w2"].T
    x = _rmsnorm(x, w["norm"], cfg.norm_eps)
    return x @ w["output" if "output" in w else "tok_embeddings"].T


def relative_error(a, b):
    """max |a - b| / max |b|: one number for a whole logits array."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())
