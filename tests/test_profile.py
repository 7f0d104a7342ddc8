"""Device profiles: the file format, layers by speed within memory, uneven tensor slices.

Pure functions are tested in one process; the uneven tensor-parallel run is collective.
"""
import json

import numpy as np
import pytest

import dllm
from dllm.comm import Comm
from dllm.config import ModelConfig
from dllm.errors import DllmError
from dllm.placement import kv_bytes, layer_bytes, root_bytes, stage_bytes
from dllm.profile import (Profile, assign_layers, check_tensor_memory, parse_bytes,
                          pipeline_stages, read_profile, tensor_shares)
from dllm.shard import block_split, blocked_rows, plan, proportional_counts
from dllm.stats import conditions

from conftest import CONFIGS, WORLD, all_ranks, make_model
from reference import relative_error

LLAMA7B = ModelConfig(dim=4096, hidden_dim=11008, n_layers=32, n_heads=32, n_kv_heads=32,
                      vocab_size=32000, max_seq_len=4096)


def profile(memories, speeds, layers=None):
    data = {"devices": [{"name": f"d{i}", "memory": m, "speed": s}
                        for i, (m, s) in enumerate(zip(memories, speeds))]}
    if layers is not None:
        data["layers"] = layers
    return Profile.from_dict(data)


# --- the file ---------------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [(4000, 4000), ("8GB", 8 * 10 ** 9), ("1.5 GiB", 3 * 2 ** 29),
                                           ("512MiB", 2 ** 29), ("12kb", 12000)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["8 parsecs", "-1GB", "", "GB", True])
def test_parse_bytes_refuses_nonsense(bad):
    with pytest.raises(DllmError, match="is not a size"):
        parse_bytes(bad)


def test_profile_file_round_trip(tmp_path):
    data = {"devices": [{"name": "m1", "host": "a", "memory": "8GB", "speed": 1.0},
                        {"name": "pc", "host": "b", "memory": 12e9, "speed": 2.5}],
            "links": [{"between": ["m1", "pc"], "latency_ms": 2.0, "bandwidth_mbit_s": 300}],
            "default_link": {"latency_ms": 0.5, "bandwidth_mbit_s": 1000},
            "layer_ms": 30, "classifier_ms": 12, "layers": [10, 22]}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    p = read_profile(path)
    assert [d.memory for d in p.devices] == [8 * 10 ** 9, 12 * 10 ** 9]
    assert p.speeds == [1.0, 2.5] and p.layers == (10, 22)
    assert p.link(0, 1).latency == pytest.approx(0.002)
    assert p.link(1, 0).bandwidth == pytest.approx(300e6 / 8)
    assert Profile.from_dict(p.to_dict()) == p


@pytest.mark.parametrize("data,fragment", [
    ({}, "devices"),
    ({"devices": [{"speed": 1}]}, "memory"),
    ({"devices": [{"memory": "1GB", "speed": 0}]}, "speed"),
    ({"devices": [{"name": "a", "memory": 1}, {"name": "a", "memory": 1}]}, "unique"),
    ({"devices": [{"memory": 1}], "layers": [1, 2]}, "layers"),
    ({"devices": [{"name": "a", "memory": 1}], "links": [{"between": ["a", "b"]}]}, "between"),
    ({"devices": [{"memory": 1}], "default_link": {"latency_ms": 1}}, "bandwidth"),
])
def test_bad_profiles_name_the_field(data, fragment):
    with pytest.raises(DllmError, match=fragment):
        Profile.from_dict(data)


def test_missing_or_broken_profile_file(tmp_path):
    with pytest.raises(DllmError, match="not found"):
        read_profile(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{devices")
    with pytest.raises(DllmError, match="not valid JSON"):
        read_profile(tmp_path / "bad.json")


def test_link_lookup_falls_back_to_local_then_default():
    p = Profile.from_dict({
        "devices": [{"name": "a", "host": "h", "memory": 1}, {"name": "b", "host": "h", "memory": 1},
                    {"name": "c", "host": "k", "memory": 1}],
        "local_link": {"latency_ms": 0.01, "bandwidth_mbit_s": 80000},
        "default_link": {"latency_ms": 1, "bandwidth_mbit_s": 1000}})
    assert p.link(0, 1).latency == pytest.approx(1e-5) and p.link(0, 2).latency == pytest.approx(1e-3)
    with pytest.raises(DllmError, match="no link between"):
        profile([1, 1], [1, 1]).link(0, 1)


# --- proportional splits ----------------------------------------------------------------------
def test_proportional_counts_examples():
    assert proportional_counts(10, [1, 1, 1]) == [4, 3, 3]
    assert proportional_counts(10, [1, 3], caps=[10, 5]) == [5, 5]
    assert proportional_counts(7, [0, 1, 0], caps=[7, 3, 7]) == [4, 3, 0]
    assert proportional_counts(5, [1, 100, 1], minimum=1) == [1, 3, 1]
    with pytest.raises(DllmError, match="do not fit"):
        proportional_counts(10, [1, 1], caps=[4, 5])


def test_proportional_counts_properties_on_random_inputs():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 7))
        total = int(rng.integers(0, 60))
        weights = rng.random(n) * (rng.random(n) > 0.2)
        caps = rng.integers(0, 30, n)
        if caps.sum() < total:
            caps[0] += total - caps.sum()
        counts = proportional_counts(total, weights, caps)
        assert sum(counts) == total and all(0 <= c <= cap for c, cap in zip(counts, caps))
        if weights.sum() > 0 and caps.min() >= total:   # uncapped: within one of the ideal
            ideal = total * weights / weights.sum()
            assert np.all(np.abs(np.array(counts) - ideal) < 1 + 1e-9)


# --- pipeline: layers by speed, within memory ---------------------------------------------------
def test_layers_follow_speed_when_memory_allows():
    p = profile(["100GB"] * 3, [1, 2, 5])
    assert assign_layers(LLAMA7B, "q40", p, 4096) == [4, 8, 20]


def test_layers_never_exceed_memory_and_the_rest_moves_to_others():
    per_layer = layer_bytes(LLAMA7B, "q40") + kv_bytes(LLAMA7B, 1024)
    small = root_bytes(LLAMA7B, "q40") + 3 * per_layer + 1000   # root holds at most 3 layers
    p = profile([small, "100GB", "100GB"], [10, 1, 1])
    layers = assign_layers(LLAMA7B, "q40", p, 1024)
    assert layers == [3, 15, 14]


def test_random_profiles_never_overfill_a_rank():
    rng = np.random.default_rng(1)
    for _ in range(100):
        n = int(rng.integers(1, 6))
        memories = rng.integers(1, 12, n) * 10 ** 9
        speeds = rng.uniform(0.2, 4, n)
        p = profile(memories.tolist(), speeds.tolist())
        try:
            layers = assign_layers(LLAMA7B, "q40", p, 2048)
        except DllmError as exc:
            assert "do not fit" in str(exc) or "cannot hold" in str(exc)
            continue
        assert sum(layers) == 32
        for rank, (n_layers, memory) in enumerate(zip(layers, memories)):
            assert stage_bytes(LLAMA7B, "q40", n_layers, rank == 0, 2048) <= memory


def test_fixed_layers_are_checked_against_memory():
    assert assign_layers(LLAMA7B, "q40", profile(["100GB"] * 2, [1, 1], [30, 2]), 4096) == [30, 2]
    with pytest.raises(DllmError, match="rank 1 .* cannot hold 30 layers"):
        assign_layers(LLAMA7B, "q40", profile(["100GB", "1GB"], [1, 1], [2, 30]), 4096)
    with pytest.raises(DllmError, match="assigns 3 layers but the model has 32"):
        assign_layers(LLAMA7B, "q40", profile(["100GB"] * 2, [1, 1], [1, 2]), 4096)
    with pytest.raises(DllmError, match="do not fit the profile's memory"):
        assign_layers(LLAMA7B, "q40", profile(["1GB"] * 2, [1, 1]), 4096)


def test_small_sizes_in_messages_keep_their_digits():
    with pytest.raises(DllmError, match=r"needed, 10\.0 kB in the profile"):
        assign_layers(LLAMA7B, "q40", profile(["10kB", "100GB"], [1, 1]), 4096)


FOUR = ModelConfig(dim=64, hidden_dim=128, n_layers=4, n_heads=4, n_kv_heads=4,
                   vocab_size=100, max_seq_len=16)


def test_every_pipeline_rank_but_root_holds_a_layer():
    """A rank without layers would only pass activations on: refused, naming the numbers;
    root may hold none (it still runs the embedding and the classifier)."""
    assert pipeline_stages(FOUR, "q40", 4, None, 16) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with pytest.raises(DllmError, match="4 layers cannot be split over 5 pipeline ranks"):
        pipeline_stages(FOUR, "q40", 5, None, 16)
    with pytest.raises(DllmError, match=r"rank 1 \(d1\) would hold none of the model's 4 "
                                        r"layers over 2 pipeline ranks \(layers \[4, 0\]\)"):
        pipeline_stages(FOUR, "q40", 2, profile(["1GB"] * 2, [1, 1], [4, 0]), 16)
    with pytest.raises(DllmError, match="rank 4 .* would hold none"):
        pipeline_stages(FOUR, "q40", 5, profile(["1GB"] * 5, [1] * 5), 16)
    assert pipeline_stages(FOUR, "q40", 2, profile(["1GB"] * 2, [1, 1], [0, 4]), 16) == \
        [(0, 0), (0, 4)]
    # a slow rank still gets a layer when the speeds alone would give it none
    assert pipeline_stages(FOUR, "q40", 2, profile(["1GB"] * 2, [10, 0.1]), 16) == \
        [(0, 3), (3, 4)]


# --- tensor parallelism: uneven slices ----------------------------------------------------------
def test_plan_without_shares_is_the_even_split():
    cfg = CONFIGS["gqa"]
    for size in (1, 2, 3, 4, 8):
        shards = plan(cfg, size)
        assert [s.heads for s in shards] == block_split(cfg.n_heads, size)
        assert [s.hidden_rows for s in shards] == blocked_rows(cfg.hidden_dim, size)


@pytest.mark.parametrize("shares", [[1, 3], [1, 1, 6], [5, 1, 1, 1], [2, 2, 1]])
def test_shares_split_every_row_exactly_once_in_proportion(shares):
    cfg = LLAMA7B
    shards = plan(cfg, len(shares), shares=shares)
    for key, total in (("heads", cfg.n_heads), ("dim_rows", cfg.dim),
                       ("hidden_rows", cfg.hidden_dim), ("vocab_rows", cfg.vocab_size)):
        ranges = [getattr(s, key) for s in shards]
        assert ranges[0][0] == 0 and ranges[-1][1] == total
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(ranges, ranges[1:]))
        sizes = np.array([b - a for a, b in ranges])
        ideal = total * np.array(shares) / sum(shares)
        assert np.all(np.abs(sizes - ideal) <= max(32, 1))    # one 32-row block at most
    assert all(s.dim_rows[0] % 32 == 0 and s.hidden_rows[0] % 32 == 0 for s in shards)


def test_tensor_shares_follow_speed_and_respect_memory():
    fast = tensor_shares(LLAMA7B, "q40", profile(["100GB"] * 2, [1, 3]), 4096)
    assert fast[1] == pytest.approx(3 * fast[0], rel=1e-3)
    capped = tensor_shares(LLAMA7B, "q40", profile(["100GB", "1.5GB"], [1, 3]), 4096)
    shards = plan(LLAMA7B, 2, shares=capped)
    check_tensor_memory(LLAMA7B, "q40", profile(["100GB", "1.5GB"], [1, 3]), shards, 4096)
    with pytest.raises(DllmError, match="needs .* for its slices"):
        check_tensor_memory(LLAMA7B, "q40", profile(["100GB", "1.5GB"], [1, 3]),
                            plan(LLAMA7B, 2), 4096)
    with pytest.raises(DllmError, match="does not fit the profile's memory"):
        tensor_shares(LLAMA7B, "q40", profile(["1GB", "1GB"], [1, 1]), 4096)


@pytest.mark.mpi
@pytest.mark.parametrize("name", ["gqa", "tied"])
def test_uneven_tensor_slices_give_the_same_logits(model_dir, name):
    path = make_model(model_dir, name, "q40")
    speeds = [1, 3, 2, 1][:WORLD.size]
    p = {"devices": [{"memory": "1GB", "speed": s} for s in speeds]}
    model = dllm.load(path, sync="f32", profile=p)
    logits = model.logits([1, 5, 9, 2, 33, 17])
    alone = dllm.load(path, Comm.self_comm(), sync="f32").logits([1, 5, 9, 2, 33, 17])
    heads = model.shard.n_heads
    shards = plan(CONFIGS[name], WORLD.size, shares=tensor_shares(
        CONFIGS[name], "q40", Profile.from_dict(p), CONFIGS[name].max_seq_len))
    layout = conditions(model.comm, model)["layout"]   # the run's conditions record the split
    assert all_ranks(heads == shards[WORLD.rank].n_heads and
                     (not WORLD.is_root or relative_error(logits, alone) <= 1e-5) and
                     (not WORLD.is_root or layout["heads_per_rank"] == [s.n_heads for s in shards]))
