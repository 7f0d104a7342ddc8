"""Karpathy llama2.c checkpoints: the legacy export (version 0) and version 1 (float32).

Version 0 (run.c's format) is 7 little-endian int32 (dim, hidden_dim, n_layers, n_heads,
n_kv_heads, vocab_size, seq_len) and float32 tensors: token_embedding, rms_att, wq, wk, wv,
wo, rms_ffn, w1, w2, w3, rms_final, freq_cis_real, freq_cis_imag [seq_len, head_size/2],
then wcls only when vocab_size is negative (an unshared classifier). There is no magic
number and no RoPE theta: theta is recovered from the stored freq_cis tables.
Version 1 starts with the magic "ak42", version 1, the same 7 ints and a shared-classifier
byte, padded to 256 bytes; then the norms, the embedding, the matrices and (unshared) wcls;
its RoPE theta is 10000. Matrices are [out, in] rows, wq/wk already in interleaved RoPE order.
"""
import math
import struct
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..errors import DllmError
from ..tokenizer import read_tokenizer_file
from .common import Checkpoint, LazyTensor

HEADER = struct.Struct("<7i")
MAGIC = 0x616B3432          # "ak42" read as a little-endian uint32
V1_HEADER_BYTES = 256


def _header(path):
    with open(path, "rb") as f:
        head = f.read(V1_HEADER_BYTES)
    if len(head) >= 8 and struct.unpack_from("<I", head)[0] == MAGIC:
        version = struct.unpack_from("<i", head, 4)[0]
        return version, HEADER.unpack_from(head, 8), head[36:37] == b"\x01"
    if len(head) < HEADER.size:
        return None
    values = HEADER.unpack_from(head)
    return 0, values, values[5] > 0


def is_llama2c(path):
    """True for a version 1/2 magic, or a plausible version 0 header with the size it implies
    (or a .bin name, so that a truncated checkpoint is reported as such)."""
    head = _header(path)
    if head is None:
        return False
    version, values, shared = head
    if version != 0:
        return True
    if not _plausible(values):
        return False
    return Path(path).suffix == ".bin" or Path(path).stat().st_size == _v0_size(values, shared)


def _plausible(values):
    dim, hidden, layers, heads, kv_heads, vocab, seq = values
    return (min(dim, hidden, layers, heads, kv_heads, abs(vocab), seq) > 0
            and dim % heads == 0 and heads % kv_heads == 0 and dim < 1 << 17)


def _layout(values, shared, version):
    """[(name, shape)] of the float32 arrays in file order (per-layer arrays stacked)."""
    dim, hidden, L, heads, kv_heads, vocab, seq = values
    vocab, head = abs(vocab), dim // heads
    kv = kv_heads * head
    mats = [("wq", (L, dim, dim)), ("wk", (L, kv, dim)), ("wv", (L, kv, dim)),
            ("wo", (L, dim, dim))]
    ffn = [("w1", (L, hidden, dim)), ("w2", (L, dim, hidden)), ("w3", (L, hidden, dim))]
    if version == 0:
        layout = ([("tok_embeddings", (vocab, dim)), ("attention_norm", (L, dim))] + mats +
                  [("ffn_norm", (L, dim))] + ffn +
                  [("norm", (dim,)), ("freq_cis_real", (seq, head // 2)),
                   ("freq_cis_imag", (seq, head // 2))])
    else:
        layout = ([("attention_norm", (L, dim)), ("ffn_norm", (L, dim)), ("norm", (dim,)),
                   ("tok_embeddings", (vocab, dim))] + mats + ffn)
    return layout + ([] if shared else [("output", (vocab, dim))])


def _v0_size(values, shared):
    return HEADER.size + 4 * sum(math.prod(s) for _, s in _layout(values, shared, 0))


def read_llama2c(path, tokenizer_path=None):
    """Open a llama2.c checkpoint as a Checkpoint."""
    path = Path(path)
    try:
        head = _header(path)
    except OSError as exc:
        raise DllmError(f"{path} cannot be read: {exc.strerror or exc}") from None
    if head is None:
        raise DllmError(f"{path} is too short to be a llama2.c checkpoint")
    version, values, shared = head
    if version not in (0, 1):
        raise DllmError(f"{path}: llama2.c export version {version} is not supported "
                        f"(dllm reads the legacy format and version 1, float32)")
    if not _plausible(values):
        raise DllmError(f"{path}: header {list(values)} is not a llama2.c model")
    dim, hidden, L, heads, kv_heads, vocab, seq = values
    layout = _layout(values, shared, version)
    offset = HEADER.size if version == 0 else V1_HEADER_BYTES
    expected = offset + 4 * sum(math.prod(s) for _, s in layout)
    size = path.stat().st_size
    if size < expected:
        raise DllmError(f"{path} is truncated: its header implies {expected} bytes, the file "
                        f"has {size}")
    if size > expected:
        raise DllmError(f"{path} has {size - expected} bytes more than its header implies; "
                        f"not a llama2.c version {version} checkpoint")
    arrays = {}
    for name, shape in layout:
        arrays[name] = np.memmap(path, np.float32, "r", offset, shape)
        offset += 4 * math.prod(shape)
    warnings = []
    theta = 10000.0
    if version == 0:
        theta, warning = theta_from_freq_cis(arrays["freq_cis_real"], arrays["freq_cis_imag"],
                                             dim // heads)
        warnings += [warning] if warning else []
    config = ModelConfig(dim=dim, hidden_dim=hidden, n_layers=L, n_heads=heads,
                         n_kv_heads=kv_heads, vocab_size=abs(vocab), max_seq_len=seq,
                         norm_eps=1e-5, rope_theta=theta, tie_embeddings=shared,
                         bos_id=1, eos_id=2).check()
    tokenizer = _find_tokenizer(path, abs(vocab), tokenizer_path)
    return Checkpoint(config, lambda: llama2c_tensors(arrays, config), tokenizer,
                      metadata={"source": f"llama2c:{path.name}",
                                "source_format": f"llama2c-v{version}"},
                      warnings=warnings, config_origin="the llama2.c header")


def llama2c_tensors(arrays, config):
    for name in ("tok_embeddings", "norm") + (() if config.tie_embeddings else ("output",)):
        yield name, LazyTensor.of(arrays[name])
    for i in range(config.n_layers):
        for name in ("attention_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3"):
            yield f"layers/{i}/{name}", LazyTensor.of(arrays[name][i])


def theta_from_freq_cis(real, imag, head_size):
    """(theta, warning) from the RoPE tables: at position 1, pair j turns by
    theta^(-2j/head_size) radians, so each j > 0 gives log theta; the median is rounded to
    an integer when that is within 1e-4, and checked against every stored entry."""
    if head_size < 4 or real.shape[0] < 2:
        return 10000.0, "RoPE tables too small to recover theta; using 10000"
    angles = np.arctan2(np.asarray(imag[1], np.float64), np.asarray(real[1], np.float64))
    j = np.arange(1, head_size // 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        estimates = -np.log(angles[1:]) * head_size / (2 * j)
    estimates = estimates[np.isfinite(estimates)]
    if not len(estimates):
        return 10000.0, "RoPE tables hold no usable angles; using theta 10000"
    theta = float(np.exp(np.median(estimates)))
    if abs(theta - round(theta)) <= 1e-4 * theta:
        theta = float(round(theta))
    freqs = theta ** (-np.arange(0, head_size, 2) / head_size)
    angles = np.outer(np.arange(real.shape[0]), freqs)
    err = max(np.abs(np.cos(angles) - real).max(), np.abs(np.sin(angles) - imag).max())
    if not err < 1e-3:
        return theta, f"RoPE tables differ from theta {theta:g} by {err:.2g}"
    return theta, None


def _find_tokenizer(path, vocab, tokenizer_path):
    """--tokenizer, else a tokenizer beside the checkpoint: tokenizer.model, tokenizer.bin,
    tok<vocab>.bin (llama2.c's name for custom vocabularies)."""
    if tokenizer_path is not None:
        return read_tokenizer_file(tokenizer_path)
    for name in ("tokenizer.model", "tokenizer.bin", f"tok{vocab}.model", f"tok{vocab}.bin"):
        if (path.parent / name).is_file():
            return read_tokenizer_file(path.parent / name)
    return None
