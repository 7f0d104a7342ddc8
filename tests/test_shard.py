"""The shard plan covers every row exactly once, and the exchange payloads are exact."""
import numpy as np
import pytest

from dllm import backend
from dllm.config import ModelConfig
from dllm.errors import DllmError
from dllm.quant import dequantize_q80, quantize_q80
from dllm.shard import blocked_rows, plan, slice_sizes
from dllm.sync import SliceExchange

SHAPES = [
    ModelConfig(dim=4096, hidden_dim=11008, n_layers=1, n_heads=32, n_kv_heads=32,
                vocab_size=32000, max_seq_len=16),                      # Llama 2 7B
    ModelConfig(dim=4096, hidden_dim=14336, n_layers=1, n_heads=32, n_kv_heads=8,
                vocab_size=128256, max_seq_len=16),                     # Llama 3 8B
    ModelConfig(dim=2048, hidden_dim=5632, n_layers=1, n_heads=32, n_kv_heads=4,
                vocab_size=32000, max_seq_len=16),                      # TinyLlama 1.1B
    ModelConfig(dim=64, hidden_dim=172, n_layers=1, n_heads=8, n_kv_heads=4,
                vocab_size=512, max_seq_len=16),                        # stories260K
    ModelConfig(dim=96, hidden_dim=200, n_layers=1, n_heads=6, n_kv_heads=2,
                vocab_size=77, max_seq_len=16),                         # odd sizes
]


def covered_once(ranges, n):
    counts = np.zeros(n, int)
    for a, b in ranges:
        counts[a:b] += 1
    return bool((counts == 1).all())


@pytest.mark.parametrize("config", SHAPES)
@pytest.mark.parametrize("size", range(1, 9))
def test_plan_covers_every_row_exactly_once(config, size):
    if size > config.n_heads:
        pytest.skip("more ranks than query heads")
    shards = plan(config, size)
    assert [s.rank for s in shards] == list(range(size))
    for name, n in [("wq", config.dim), ("wo", config.dim), ("w2", config.dim),
                    ("w1", config.hidden_dim), ("w3", config.hidden_dim),
                    ("output", config.vocab_size)]:
        assert covered_once([s.rows(name) for s in shards], n), name
    # Every query head finds its kv head on its own rank; every kv head is on some rank.
    needed_kv = set()
    for s in shards:
        for h in range(*s.heads):
            assert s.kv_heads[0] <= h // config.q_per_kv < s.kv_heads[1]
        needed_kv.update(range(*s.kv_heads))
        assert s.kv_rows == (s.kv_heads[0] * config.head_dim, s.kv_heads[1] * config.head_dim)
    assert needed_kv == set(range(config.n_kv_heads))
    if size <= config.n_kv_heads and config.n_kv_heads % size == 0:
        assert covered_once([s.rows("wk") for s in shards], config.kv_dim)


def test_more_ranks_than_kv_heads_duplicates_kv_rows():
    config = SHAPES[1]  # 8 kv heads
    shards = plan(config, 16)
    assert all(s.n_kv_heads == 1 for s in shards)
    assert shards[0].kv_heads == shards[1].kv_heads == (0, 1)


def test_splits_of_dim_and_hidden_are_whole_blocks():
    assert blocked_rows(11008, 8) == [(i * 1376, (i + 1) * 1376) for i in range(8)]
    assert blocked_rows(172, 3) == [(0, 64), (64, 128), (128, 172)]
    assert blocked_rows(64, 3) == [(0, 32), (32, 64), (64, 64)]


def test_too_many_ranks_is_refused_with_the_numbers():
    with pytest.raises(DllmError, match="cannot split 8 query heads over 9 ranks"):
        plan(SHAPES[3], 9)


@pytest.mark.parametrize("widths", [[32, 32], [48, 16, 0], [8, 8, 8, 8], [100]])
@pytest.mark.parametrize("payload", ["q80", "f32"])
def test_exchange_pack_unpack(widths, payload):
    """Decoding every rank's payload gives the slices back (exactly for f32; for q80 each
    slice equals its own zero-padded Q8_0 round trip)."""
    ex = SliceExchange(widths, payload)
    T = 3
    rng = np.random.default_rng(0)
    slices = [rng.standard_normal((T, w)).astype(np.float32) for w in widths]
    buffer = np.concatenate([ex.pack(s, r) for r, s in enumerate(slices)])
    assert len(buffer) == sum(ex.counts(T)[0])
    out = ex.unpack(buffer, T)
    for r, s in enumerate(slices):
        got = out[:, ex.offsets[r]:ex.offsets[r + 1]]
        if payload == "f32":
            assert np.array_equal(got, s)
        else:
            pad = -(-s.shape[1] // 32) * 32 - s.shape[1]
            rt = dequantize_q80(quantize_q80(np.pad(s, ((0, 0), (0, pad)))))[:, :s.shape[1]]
            assert np.array_equal(got, rt)
    assert sum(ex.bytes_received(r, T) for r in range(len(widths))) == \
        sum(ex.bytes_sent(r, T) for r in range(len(widths)))


@pytest.mark.parametrize("kernels", ["numpy", "fast"])
@pytest.mark.parametrize("widths", [[64, 32], [96], [32, 0, 64], [48, 16]])
@pytest.mark.parametrize("T", [1, 3])
def test_exchange_as_matmul_input(widths, T, kernels):
    """unpack_input gives what quantize_input makes of unpack's values, also where it reads
    the Q8_0 bytes directly (every slice whole blocks)."""
    if kernels == "fast":
        pytest.importorskip("numba", reason="numba is not installed (dllm[fast])")
    codec = backend.make(kernels)
    ex = SliceExchange(widths, "q80", codec)
    rng = np.random.default_rng(1)
    buffer = np.concatenate([ex.pack(rng.standard_normal((T, w)).astype(np.float32), r)
                             for r, w in enumerate(widths)])
    expected, got = codec.quantize_input(ex.unpack(buffer, T)), ex.unpack_input(buffer, T, codec)
    assert type(got) is type(expected)
    for name in ("codes", "scale", "pairs", "offset") if hasattr(got, "codes") else ():
        np.testing.assert_array_equal(getattr(got, name), getattr(expected, name))
    np.testing.assert_array_equal(getattr(got, "x", got), getattr(expected, "x", expected))


def test_slice_sizes_sum_to_full_widths():
    config = SHAPES[0]
    shards = plan(config, 3)
    assert sum(slice_sizes(shards, "attention")) == config.dim
    assert sum(slice_sizes(shards, "hidden")) == config.hidden_dim
    assert sum(slice_sizes(shards, "vocab")) == config.vocab_size
