"""Scheme "star" (Distributed Llama 0.1, the paper's design): the same function as the other
schemes, and the bytes of its formula on every rank (docs/sync.md)."""
import numpy as np
import pytest

import dllm
from dllm.comm import Comm
from dllm.config import ModelConfig
from dllm.errors import DllmError
from dllm.kvcache import PagedStep
from dllm.placement import shard_bytes
from dllm.serve.engine import make_pool
from dllm.shard import plan

from conftest import CONFIGS, WORLD, all_ranks, make_model, random_weights
from reference import reference_logits, relative_error
from test_schemes import block_widths, payload_bytes

pytestmark = pytest.mark.mpi
TOKENS = [1, 5, 9, 2, 33, 17, 40, 3]
# Every split even at 1, 2 and 4 ranks (dim, hidden, kv_dim in whole 32-value blocks per rank).
EVEN = {"even": ModelConfig(dim=128, hidden_dim=256, n_layers=2, n_heads=4, n_kv_heads=4,
                            vocab_size=64, max_seq_len=16)}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_f32_star_matches_independent_reference(model_dir, name):
    """Prefill in chunks of 3 (pos > 0) and decoding steps, f32 weights and sync."""
    model = dllm.load(make_model(model_dir, name, "f32"), sync="f32", sync_scheme="star",
                      prefill_chunk=3)
    block = model.logits(TOKENS)
    steps = [model.forward([t], pos) for pos, t in enumerate(TOKENS)]
    ok = True
    if WORLD.is_root:
        expected = reference_logits(random_weights(CONFIGS[name], 0), CONFIGS[name], TOKENS)
        ok = (relative_error(block, expected) <= 1e-4
              and relative_error(np.concatenate(steps), expected) <= 1e-4)
    else:
        ok = block is None and all(s is None for s in steps)
    assert all_ranks(ok)


@pytest.mark.parametrize("other", ["slices", "partials", "reduce"])
def test_star_agrees_with_the_other_schemes(model_dir, other):
    """f32 sync: the same logits to float rounding; q80: within Q8_0 rounding of them."""
    path = make_model(model_dir, "gqa", "q40")
    errors = []
    for sync, bound in (("f32", 1e-5), ("q80", 0.05)):
        star = dllm.load(path, sync=sync, sync_scheme="star").logits(TOKENS)
        them = dllm.load(path, sync="f32", sync_scheme=other).logits(TOKENS)
        errors.append(not WORLD.is_root or relative_error(star, them) <= bound)
    assert all_ranks(all(errors))


def test_only_root_holds_the_cache_and_the_classifier(model_dir):
    path = make_model(model_dir, "gqa", "q40")
    model = dllm.load(path, sync_scheme="star")
    cfg, root = CONFIGS["gqa"], WORLD.is_root
    ok = (model.state.k_cache.shape[1] == (cfg.n_kv_heads if root else 0)
          and ("output" in model.weights) == root)
    shards = plan(cfg, 4, "star")
    memory = [shard_bytes(cfg, "q40", s, s.rank == 0, 48) for s in shards]
    slices = [shard_bytes(cfg, "q40", s, s.rank == 0, 48) for s in plan(cfg, 4)]
    assert memory[0] > slices[0] and memory[1] < slices[1]
    assert [s.n_kv_heads for s in shards] == [1, 1, 0, 0]     # each kv head once
    assert all_ranks(ok)


def heads_widths(heads, head_dim, n):
    return [head_dim * (heads // n + (r < heads % n)) for r in range(n)]


def star_rank_bytes(sync, cfg, n, r):
    """(received, sent) of rank r for one decoded token: per layer root Bcasts the normalized
    x twice and the attention output, Gathers every rank's q, k, v, wo, hidden and w2 slices,
    and sends each rank the hidden slices of the others. No embedding Bcast, no logits Gather
    (root holds the residual stream and the classifier). Written from the scheme's definition,
    independently of dllm.sync."""
    B = lambda w: payload_bytes(w, sync)                  # noqa: E731
    q = heads_widths(cfg.n_heads, cfg.head_dim, n)
    kv = heads_widths(cfg.n_kv_heads, cfg.head_dim, n)
    dim, hidden = block_widths(cfg.dim, n), block_widths(cfg.hidden_dim, n)
    up = [B(q[s]) + 2 * B(kv[s]) + 2 * B(dim[s]) + B(hidden[s]) for s in range(n)]
    down = [3 * B(cfg.dim) + sum(B(hidden[t]) for t in range(n) if t != s) for s in range(n)]
    if r == 0:
        received, sent = sum(up[1:]), sum(down[1:])
    else:
        received, sent = down[r], up[r]
    return cfg.n_layers * received, cfg.n_layers * sent


def one_token(model):
    model.forward([3], 0)
    before = model.comm.stats.snapshot()
    model.forward([4], 1)
    return model.comm.stats.since(before)


@pytest.mark.parametrize("sync", ["q80", "f32"])
def test_star_bytes_per_rank_equal_the_formula(model_dir, sync):
    """gqa: hidden is 5 blocks (uneven at 2 and 4 ranks), 2 kv heads (none on ranks 2, 3)."""
    cfg = CONFIGS["gqa"]
    spent = one_token(dllm.load(make_model(model_dir, "gqa", "q40"), sync=sync,
                                sync_scheme="star"))
    expected = star_rank_bytes(sync, cfg, WORLD.size, WORLD.rank)
    assert all_ranks((spent.bytes_received, spent.bytes_sent) == expected)


def test_root_link_carries_the_papers_formula(model_dir):
    """Even splits: root's sent + received per token is Figure 6's sum over the links,
    (n-1) L [3 q(dim) + (n-1) q(hidden/n) + 3 q(dim/n) + 2 q(kv_dim/n) + q(hidden/n)] with
    q(w) = 34 w / 32; every byte a worker moves is on root's link."""
    cfg, n = EVEN["even"], WORLD.size
    spent = one_token(dllm.load(make_model(model_dir, "even", "q40", configs=EVEN, tag="star"),
                                sync_scheme="star"))
    q = lambda w: 34 * w / 32                              # noqa: E731
    kv_dim = cfg.n_kv_heads * cfg.head_dim
    paper = (n - 1) * cfg.n_layers * (3 * q(cfg.dim) + (n - 1) * q(cfg.hidden_dim / n)
                                      + 3 * q(cfg.dim / n) + 2 * q(kv_dim / n)
                                      + q(cfg.hidden_dim / n))
    link = WORLD.allgather(spent.bytes_received + spent.bytes_sent)
    assert all_ranks(link[0] == paper == sum(link[1:]))


def test_star_serves_from_a_paged_cache(model_dir):
    """A paged step (dllm.serve) over root's pool gives the contiguous cache's logits."""
    model = dllm.load(make_model(model_dir, "gqa", "q40"), sync_scheme="star",
                      prefill_chunk=len(TOKENS))
    alone = model.logits(TOKENS)
    pool = make_pool(WORLD, model, kv_blocks=12, block_size=4)
    step = PagedStep(pool, [([5, 2], 0, len(TOKENS), "all")], model.head_kv, model.kernels)
    paged = model.forward(TOKENS, 0, logits="plan", step=step)
    ok = (pool.k.shape[2] == (CONFIGS["gqa"].n_kv_heads if WORLD.is_root else 0)
          and (not WORLD.is_root or relative_error(paged, alone) <= 1e-5))
    assert all_ranks(ok)


def test_pipeline_refuses_star(model_dir):
    with pytest.raises(DllmError, match="--sync-scheme star applies to --parallel tensor"):
        dllm.load(make_model(model_dir, "gqa", "q40"), sync_scheme="star",
                  parallel="pipeline")


def test_star_alone_needs_no_other_rank(model_dir):
    """On one rank star exchanges nothing and only rounds what it would send (q80)."""
    path = make_model(model_dir, "gqa", "q40")
    model = dllm.load(path, Comm.self_comm(), sync="q80", sync_scheme="star")
    spent = one_token(model)
    assert (spent.bytes_received, spent.bytes_sent) == (0, 0)


def test_linkprobe_makes_the_collectives_of_the_forward(model_dir):
    """dllm.linkprobe's star collectives (one layer's) move a decoded token's bytes."""
    from dllm.linkprobe import decode_collectives
    cfg = CONFIGS["gqa"]
    spent = one_token(dllm.load(make_model(model_dir, "gqa", "q40"), sync_scheme="star"))
    before = WORLD.stats.snapshot()
    for label, _, call in decode_collectives(WORLD, cfg, "star", "q80"):
        assert label.startswith("layer: ")
        call()
    probe = WORLD.stats.since(before)
    assert all_ranks((cfg.n_layers * probe.bytes_received, cfg.n_layers * probe.bytes_sent)
                     == (spent.bytes_received, spent.bytes_sent))


@pytest.mark.parametrize("preset", ["llama2-7b", "llama2-13b", "llama2-70b"])
def test_plotted_formula_is_the_busiest_receivers_bytes(preset):
    from dllm.benchplots import formula_received_max
    from dllm.converters.synthetic import PRESETS
    cfg = PRESETS[preset]
    as_dict = {k: getattr(cfg, k) for k in ("dim", "hidden_dim", "n_layers", "vocab_size",
                                            "n_heads", "n_kv_heads")}
    for n in (1, 2, 4, 8):
        want = max(star_rank_bytes("q80", cfg, n, r)[0] for r in range(n)) if n > 1 else 0
        assert formula_received_max("star", "q80", as_dict, n) == want


def test_root_link_is_figure_6_within_half_a_percent():
    """Root's sent + received per token by the per-rank formula, against Figure 6 (kB read
    as KiB): Llama 2 7B at 2 / 4 / 8 devices, 13B at 2."""
    from dllm.converters.synthetic import PRESETS
    from dllm.reproduction import PAPER_KB
    for preset, n, kib in (("llama2-7b", 2, 1113.5), ("llama2-7b", 4, 2830.5),
                           ("llama2-7b", 8, 6009.5), ("llama2-13b", 2, 1742.5)):
        root = sum(star_rank_bytes("q80", PRESETS[preset], n, 0)) / 1024
        assert root == kib
        assert abs(root / PAPER_KB[preset][n] - 1) < 0.005


@pytest.mark.parametrize("size", [1, 2, 3, 4, 8])
def test_star_plan_covers_every_row_once(size):
    """wq, wo, w1, w3, w2 split as in slices; wk, wv by kv heads, each on one rank; root
    attends over every head, caches every kv head, holds every classifier row."""
    cfg = CONFIGS["gqa"]
    star, slices = plan(cfg, size, "star"), plan(cfg, size)
    kv = [k for s in star for k in range(*s.kv_heads)]
    assert kv == list(range(cfg.n_kv_heads))
    for a, b in zip(star, slices):
        assert (a.heads, a.dim_rows, a.hidden_rows) == (b.heads, b.dim_rows, b.hidden_rows)
        assert not a.row_parallel and a.rows("wo") == b.rows("wo")
    assert star[0].vocab_rows == (0, cfg.vocab_size)
    assert star[0].attention_heads == (0, cfg.n_heads)
    assert star[0].n_cache_kv_heads == cfg.n_kv_heads
    assert all(s.n_cache_kv_heads == 0 and s.vocab_rows[0] == s.vocab_rows[1]
               for s in star[1:])


def test_star_with_uneven_slices_by_speed(model_dir):
    """A device profile (uneven slices, kv heads in proportion too) changes no logit."""
    path = make_model(model_dir, "gqa", "q40")
    p = {"devices": [{"memory": "1GB", "speed": s} for s in [1, 3, 2, 1][:WORLD.size]]}
    star = dllm.load(path, sync="f32", sync_scheme="star", profile=p).logits(TOKENS)
    alone = dllm.load(path, Comm.self_comm(), sync="f32").logits(TOKENS)
    assert all_ranks(not WORLD.is_root or relative_error(star, alone) <= 1e-5)
