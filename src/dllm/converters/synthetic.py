"""Synthetic models of real shapes: random Q4_0 weights written directly as bytes, so speed
and memory can be studied without downloading weights (a 7B file in about a minute).

Every Q4_0 block gets uniform random 4-bit codes (value d * (c - 8), c in 0..15: mean -0.5 d,
rms 4.64 d) and a scale d = +-s * U(0.75, 1.25) with a random sign, so blocks carry no common
offset. s = 1 / (4.64 sqrt(cols)) makes every matrix map unit-rms inputs to unit-rms outputs
(the embedding rows have unit rms), as trained weights roughly do; norm weights are 1. The
residual stream then grows like the square root of the depth: logits stay finite for 80
layers (tests/test_convert.py runs a reduced preset).
"""
import numpy as np

from ..config import ModelConfig
from ..errors import DllmError
from ..modelfile import StoredTensor, tensor_shapes
from ..quant import Q40_BLOCK_BYTES
from .common import Checkpoint

# Shapes of the published models (their config.json / params.json).
PRESETS = {
    "llama2-7b": ModelConfig(dim=4096, hidden_dim=11008, n_layers=32, n_heads=32,
                             n_kv_heads=32, vocab_size=32000, max_seq_len=4096),
    "llama2-13b": ModelConfig(dim=5120, hidden_dim=13824, n_layers=40, n_heads=40,
                              n_kv_heads=40, vocab_size=32000, max_seq_len=4096),
    "llama2-70b": ModelConfig(dim=8192, hidden_dim=28672, n_layers=80, n_heads=64,
                              n_kv_heads=8, vocab_size=32000, max_seq_len=4096),
    "llama3-8b": ModelConfig(dim=4096, hidden_dim=14336, n_layers=32, n_heads=32,
                             n_kv_heads=8, vocab_size=128256, max_seq_len=8192,
                             rope_theta=500000.0, bos_id=128000, eos_id=128001),
    "tinyllama-1.1b": ModelConfig(dim=2048, hidden_dim=5632, n_layers=22, n_heads=32,
                                  n_kv_heads=4, vocab_size=32000, max_seq_len=2048),
}
CODE_RMS = float(np.sqrt(np.mean((np.arange(16) - 8.0) ** 2)))   # 4.64


def synthetic_config(preset, layers=None):
    if preset not in PRESETS:
        raise DllmError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    config = PRESETS[preset]
    if layers is not None:
        if layers < 1:
            raise DllmError(f"--layers must be at least 1, got {layers}")
        config = ModelConfig(**{**config.to_dict(), "n_layers": layers})
    return config.check()


def read_synthetic(preset, layers=None, seed=0):
    """A Checkpoint of random Q4_0 weights in the preset's shapes (layers: keep the first N)."""
    config = synthetic_config(preset, layers)
    rng = np.random.default_rng(seed)
    name = f"synthetic:{preset}" + (f":{layers}-layers" if layers else "")
    return Checkpoint(config, lambda: synthetic_tensors(config, rng),
                      metadata={"source": name, "source_format": "synthetic", "seed": seed},
                      warnings=["synthetic weights: random values of the preset's shapes"],
                      config_origin=f"the preset {preset}")


def synthetic_tensors(config, rng):
    for name, shape in tensor_shapes(config).items():
        if len(shape) == 1:
            yield name, StoredTensor(np.ones(shape, np.float32), "f32", "ones")
        else:
            rms = 1.0 if name == "tok_embeddings" else 1.0 / np.sqrt(shape[1])
            yield name, StoredTensor(random_q40(rng, shape, rms), "q40", "random")


def random_q40(rng, shape, rms):
    """Q4_0 bytes (rows, cols/32*18) whose values have about the given rms."""
    rows, cols = shape
    blocks = rows * (cols // 32)
    out = np.frombuffer(rng.bytes(blocks * Q40_BLOCK_BYTES), np.uint8).copy()
    out = out.reshape(blocks, Q40_BLOCK_BYTES)
    scale = rms / CODE_RMS
    d = rng.uniform(0.75 * scale, 1.25 * scale, blocks).astype(np.float32)
    d *= np.where(rng.integers(0, 2, blocks, dtype=np.uint8), 1, -1).astype(np.float32)
    out[:, :2] = d.astype("<f2").view(np.uint8).reshape(blocks, 2)
    return out.reshape(rows, cols // 32 * Q40_BLOCK_BYTES)
