"""The pipeline-parallel model against the centralized one (one rank, COMM_SELF).

Collective (marked mpi): run serially on one rank and under mpirun -n 2 / -n 4. The models
have 4 layers, so that every rank holds at least one at 4 ranks (a rank with none is refused).
"""
import dataclasses

import numpy as np
import pytest

import dllm
from dllm.comm import Comm
from dllm.config import ModelConfig
from dllm.errors import DllmError
from dllm.modelfile import write_model
from dllm.pipeline import HEADER_BYTES
from dllm.placement import split_layers, stage_bytes
from dllm.placement import stage_entries
from dllm.sampler import Sampler
from dllm.stats import conditions

import conftest
from conftest import CONFIGS, WORLD, all_ranks, random_weights
from reference import reference_logits, relative_error

TOKENS = [1, 5, 9, 2, 33, 17, 40, 3, 11, 25, 7]
# The shared tiny configurations with 4 layers: one or more per rank at up to 4 ranks.
PIPE = {name: dataclasses.replace(c, n_layers=4) for name, c in CONFIGS.items()}


def make_model(model_dir, name, quant, seed=0):
    """PIPE[name] with random weights (root writes it once); every rank gets the path."""
    return conftest.make_model(model_dir, name, quant, seed, configs=PIPE, tag="-4l")


def load_pipeline(path, **options):
    return dllm.load(path, parallel="pipeline", **options)


def centralized(path, **options):
    return dllm.load(path, Comm.self_comm(), sync="f32", **options)


def same_everywhere(value):
    """True on every rank when every rank holds the same value."""
    values = WORLD.allgather(value)
    return all(v == values[0] for v in values)


# --- pure functions ---------------------------------------------------------------------------
@pytest.mark.parametrize("n_layers,size", [(2, 1), (2, 4), (8, 3), (32, 8), (5, 2)])
def test_split_layers_is_contiguous_and_covers_every_layer(n_layers, size):
    stages = split_layers(n_layers, size)
    assert stages[0][0] == 0 and stages[-1][1] == n_layers
    assert all(a[1] == b[0] for a, b in zip(stages, stages[1:]))
    counts = [b - a for a, b in stages]
    assert max(counts) - min(counts) <= 1


def test_stage_entries_root_holds_embedding_and_classifier():
    cfg = CONFIGS["gqa"]
    root = {key for key, *_ in stage_entries(cfg, (0, 1), True)}
    other = {key for key, *_ in stage_entries(cfg, (1, 2), False)}
    assert {"tok_embeddings", "output", "norm", "layers/0/wq"} <= root
    assert not any(k.startswith("layers/1/") for k in root)
    assert other == {f"layers/1/{n}" for n in ("attention_norm", "ffn_norm", "wq", "wk", "wv",
                                                "wo", "w1", "w2", "w3")}
    tied = {key for key, *_ in stage_entries(CONFIGS["tied"], (0, 0), True)}
    assert "output" not in tied   # the embedding serves as classifier


# --- the forward pass -------------------------------------------------------------------------
@pytest.mark.mpi
@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("quant", ["f32", "q40"])
def test_pipeline_f32_logits_equal_centralized_logits(model_dir, name, quant):
    path = make_model(model_dir, name, quant)
    logits = load_pipeline(path, sync="f32", prefill_chunk=4).logits(TOKENS)  # 3 chunks in flight
    alone = centralized(path).logits(TOKENS)
    ok = True
    if WORLD.is_root:
        ok = logits.shape == alone.shape == (len(TOKENS), PIPE[name].vocab_size) and \
            relative_error(logits, alone) <= 1e-5
        if quant == "f32":
            expected = reference_logits(random_weights(PIPE[name], 0), PIPE[name], TOKENS)
            ok = ok and relative_error(logits, expected) <= 1e-4
    assert all_ranks(ok)


@pytest.mark.mpi
def test_uneven_stages_from_a_profile_give_the_same_logits(model_dir):
    """Root holds no layer (as dllm.plan may choose), the last rank the most: still the
    centralized logits; the run's conditions record the split."""
    path = make_model(model_dir, "tied", "q40")
    n, total = WORLD.size, PIPE["tied"].n_layers
    layers = [0] + [1] * (n - 2) + [total - (n - 2)] if n > 1 else [total]
    profile = {"devices": [{"memory": "1GB"} for _ in range(n)], "layers": layers}
    model = load_pipeline(path, sync="f32", profile=profile)
    logits, alone = model.logits(TOKENS), centralized(path).logits(TOKENS)
    mine = model.layer_range[1] - model.layer_range[0]
    layout = conditions(model.comm, model)["layout"]
    assert all_ranks(mine == layers[WORLD.rank] and layout == {"layers_per_rank": layers} and
                     (not WORLD.is_root or relative_error(logits, alone) <= 1e-5))


@pytest.mark.mpi
def test_sequences_in_flight_are_checked_against_the_profile_memory(model_dir):
    """The profile's memory holds every rank's layers with KV caches for 2 sequences: 2 run,
    3 raise the same one-line error on every rank, and the ring stays usable."""
    path = make_model(model_dir, "gqa", "q40")
    cfg, n = PIPE["gqa"], WORLD.size
    layers = [b - a for a, b in split_layers(cfg.n_layers, n)]
    memory = [stage_bytes(cfg, "q40", count, rank == 0, cfg.max_seq_len, 2)
              for rank, count in enumerate(layers)]
    profile = {"devices": [{"memory": m} for m in memory], "layers": layers}
    model = load_pipeline(path, sync="f32", profile=profile)
    two = list(model.generate_many([[1, 2], [3]] if WORLD.is_root else None, 3, Sampler(0.0),
                                   stop_at_eos=False))
    try:
        list(model.generate_many([[1, 2], [3], [4]] if WORLD.is_root else None, 3,
                                 Sampler(0.0), stop_at_eos=False))
        error = None
    except DllmError as exc:
        error = str(exc)
    logits = model.logits(TOKENS)
    assert all_ranks(len(two) == 6 and error is not None and "3 sequences in flight need" in
                     error and "\n" not in error and same_everywhere(error) and
                     (not WORLD.is_root or logits.shape == (len(TOKENS), cfg.vocab_size)))


@pytest.mark.mpi
def test_decode_one_token_at_a_time_equals_block_forward(model_dir):
    path = make_model(model_dir, "mha", "f32")
    model = load_pipeline(path, sync="f32")
    block = model.logits(TOKENS)
    steps = [model.forward([t], pos, logits="last") for pos, t in enumerate(TOKENS)]
    assert all_ranks(not WORLD.is_root or relative_error(np.concatenate(steps), block) <= 1e-5)


@pytest.mark.mpi
def test_q80_payload_bounded_error_and_near_best_greedy_tokens(model_dir):
    path = make_model(model_dir, "gqa", "q40", seed=1)
    model = load_pipeline(path, sync="q80")
    alone = centralized(path)
    q80_logits, f32_logits = model.logits(TOKENS), alone.logits(TOKENS)
    error = relative_error(q80_logits, f32_logits) if WORLD.is_root else 0.01
    greedy = list(model.generate(TOKENS[:3], 20, Sampler(0.0), stop_at_eos=False))
    # Q80 rounding may flip a near-tie (it does at 4 hops), after which the texts part: fed
    # the pipeline's own tokens, the centralized model ranks each of them within the Q80
    # error of its best token
    teacher = alone.logits(TOKENS[:3] + greedy[:-1])[2:]
    gap = teacher.max(-1) - teacher[np.arange(len(greedy)), greedy]
    near_best = np.all(gap <= 0.05 * np.abs(teacher).max())
    # one rank sends nothing, so Q80 rounds nothing there
    bound_ok = error <= 0.05 and (error > 0 or WORLD.size == 1)
    assert all_ranks(near_best and len(greedy) == 20 and bound_ok)


# --- generation -------------------------------------------------------------------------------
@pytest.mark.mpi
def test_generate_equals_centralized_on_every_rank(model_dir):
    path = make_model(model_dir, "gqa", "q40")
    model = load_pipeline(path, sync="f32")
    alone = centralized(path)
    runs = [list(m.generate([1, 4], 24, Sampler(1.0, 0.95, seed=7), stop_at_eos=False))
            for m in (model, alone)]
    assert all_ranks(runs[0] == runs[1] and len(runs[0]) == 24 and same_everywhere(runs[0]))


@pytest.mark.mpi
def test_generate_many_equals_each_sequence_alone(model_dir):
    """k sequences in flight at once give each sequence's own greedy continuation, with
    prompts of different lengths (chunks of 2: several prefill chunks in flight)."""
    path = make_model(model_dir, "mha", "q40")
    model = load_pipeline(path, sync="f32", prefill_chunk=2)
    prompts = [TOKENS[:3], TOKENS[:7], TOKENS[2:4], TOKENS[:1]]
    many = list(model.generate_many(prompts if WORLD.is_root else None, 9, Sampler(0.0),
                                    stop_at_eos=False))
    alone = centralized(path, prefill_chunk=2)    # the same blocks: the same arithmetic
    expected = [list(alone.generate(p, 9, Sampler(0.0), stop_at_eos=False)) for p in prompts]
    got = [[t for s, t in many if s == seq] for seq in range(len(prompts))]
    assert all_ranks(got == expected and same_everywhere(many))


@pytest.mark.mpi
def test_generate_many_stops_each_sequence_at_eos_and_at_the_context(model_dir):
    path = make_model(model_dir, "gqa", "f32")
    model = load_pipeline(path, sync="f32", max_seq_len=12)
    alone = centralized(path, max_seq_len=12)
    first = list(alone.generate([1, 4], 1, Sampler(0.0)))[0]
    eos = dllm.ModelConfig(**{**PIPE["gqa"].to_dict(), "eos_id": first})
    model.config = eos             # this sequence now stops after its first token
    many = list(model.generate_many([[1, 4], [1, 5, 9]] if WORLD.is_root else None, 50,
                                    Sampler(0.0)))
    lengths = [sum(1 for s, _ in many if s == seq) for seq in range(2)]
    # sequence 0 stops at "EOS"; sequence 1 fills the context: 12 - 3 + 1 tokens
    assert all_ranks(lengths[0] == 1 and lengths[1] in (10, 1) and same_everywhere(many))


@pytest.mark.mpi
def test_weights_from_root_equal_weights_from_file(model_dir):
    path = make_model(model_dir, "gqa", "q40")
    a = load_pipeline(path, sync="f32")
    b = load_pipeline(path, sync="f32", weights_from="root")
    stored = a.kernels.stored
    same = set(a.weights) == set(b.weights) and all(
        np.array_equal(stored(a.weights[k]), stored(b.weights[k])) for k in a.weights)
    logits = [a.logits(TOKENS), b.logits(TOKENS)]
    assert all_ranks(same and (not WORLD.is_root or np.array_equal(*logits)))


# --- traffic ----------------------------------------------------------------------------------
@pytest.mark.mpi
def test_bytes_per_token_equal_the_formula(model_dir):
    """A decoded token: every rank sends one message and receives one, HEADER_BYTES plus one
    dim row (Q80: dim/32*34 bytes); nothing on one rank."""
    path = make_model(model_dir, "gqa", "q40")
    cfg, n = PIPE["gqa"], WORLD.size
    model = load_pipeline(path, sync="q80")
    model.forward([3], 0)
    before = model.comm.stats.snapshot()
    model.forward([4], 1)
    spent = model.comm.stats.since(before)
    message = (HEADER_BYTES + cfg.dim // 32 * 34) if n > 1 else 0
    assert all_ranks(spent.bytes_sent == spent.bytes_received == message)


@pytest.mark.mpi
def test_large_messages_do_not_deadlock(tmp_path_factory):
    """Prompt chunks far above MPI's eager limit (64 rows x 512 f32 = 128 kB) in flight
    while results travel back to root."""
    cfg = ModelConfig(dim=512, hidden_dim=32, n_layers=4, n_heads=4, n_kv_heads=4,
                      vocab_size=40, max_seq_len=130)
    path = tmp_path_factory.getbasetemp() / "wide-f32.h5"
    if WORLD.is_root:
        write_model(path, cfg, random_weights(cfg, 3).items(), quant="f32")
    path = WORLD.bcast(str(path))
    ids = list(np.random.default_rng(0).integers(0, 40, 130))
    model = load_pipeline(path, sync="f32", prefill_chunk=64)
    logits = model.logits(ids)
    many = list(model.generate_many([ids[:70], ids[:66]] if WORLD.is_root else None, 2,
                                    Sampler(0.0), stop_at_eos=False))
    assert all_ranks((not WORLD.is_root or logits.shape == (130, 40)) and len(many) == 4)


# --- errors -----------------------------------------------------------------------------------
@pytest.mark.mpi
def test_bad_input_raises_on_every_rank(model_dir):
    path = make_model(model_dir, "mha", "q40")
    model = load_pipeline(path)
    raised = []
    for call in (lambda: model.logits([1, 999]), lambda: model.logits([]),
                 lambda: list(model.generate(list(range(49)), 2, Sampler(0.0))),
                 lambda: load_pipeline(path, sync_scheme="reduce"),
                 lambda: load_pipeline(path, profile={"devices": [{"memory": "1GB"}] * 9}),
                 lambda: load_pipeline(path, profile={"devices": [{"memory": 1000}] * WORLD.size}),
                 lambda: dllm.load(path, parallel="diagonal")):
        try:
            call()
            raised.append(None)
        except DllmError as exc:
            raised.append(str(exc))
    assert all_ranks(all(raised) and same_everywhere(raised))
    # the ring is still usable after the errors
    logits = model.logits([1, 2])
    assert all_ranks(not WORLD.is_root or logits.shape == (2, 80))


@pytest.mark.mpi
@pytest.mark.parametrize("who", ["everyone", "root", "others"])
def test_stopping_generation_early_leaves_the_ring_empty(model_dir, who):
    """A caller may break out of generate (as --chat does at an end-of-turn token) on any
    ranks: the blocks in flight are finished and the next call sees only its own messages.
    Root decides: when it stops, the sequence ends on every rank."""
    path = make_model(model_dir, "mha", "q40")
    model = load_pipeline(path, sync="f32")
    stops = who == "everyone" or (who == "root") == WORLD.is_root
    got = []
    for token in model.generate(TOKENS[:3], 12, Sampler(0.0), stop_at_eos=False):
        got.append(token)
        if stops and len(got) == 4:
            break
    many = model.generate_many([TOKENS[:2], TOKENS[:5]] if WORLD.is_root else None, 10,
                               Sampler(0.0), stop_at_eos=False)
    first = [next(many) for _ in range(3)]
    many.close()
    logits = model.logits(TOKENS)
    alone = centralized(path)
    expected = list(alone.generate(TOKENS[:3], 12, Sampler(0.0), stop_at_eos=False))
    whole = who == "others" and WORLD.is_root    # root went on to the end
    ok = got == (expected if whole else expected[:4]) and len(first) == 3
    assert all_ranks(ok and (not WORLD.is_root or
                             relative_error(logits, alone.logits(TOKENS)) <= 1e-5))
