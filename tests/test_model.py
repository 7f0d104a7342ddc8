"""The distributed forward pass against an independent reference and against one rank.

Collective (marked mpi): run serially on one rank and under mpirun -n 2 / -n 4.
"""
import numpy as np
import pytest

import dllm
from dllm.comm import Comm
from dllm.quant import dequantize_q40, quantize_q40
from dllm.sampler import Sampler
from dllm.weight_types import NAMES, TYPES

from conftest import CONFIGS, WORLD, all_ranks, make_model, random_weights
from reference import reference_logits, relative_error

pytestmark = pytest.mark.mpi
TOKENS = [1, 5, 9, 2, 33, 17, 40, 3, 11, 25, 7]


def q40_roundtrip(weights):
    return {k: dequantize_q40(quantize_q40(v)) if v.ndim == 2 else v for k, v in weights.items()}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_f32_logits_match_independent_reference(model_dir, name):
    path = make_model(model_dir, name, "f32")
    model = dllm.load(path, sync="f32", prefill_chunk=4)   # chunks of 4: exercises pos > 0
    logits = model.logits(TOKENS)
    ok = True
    if WORLD.is_root:
        expected = reference_logits(random_weights(CONFIGS[name], 0), CONFIGS[name], TOKENS)
        ok = logits.shape == (len(TOKENS), CONFIGS[name].vocab_size) and \
            relative_error(logits, expected) <= 1e-4
    assert all_ranks(ok)


@pytest.mark.parametrize("name", ["gqa", "tied"])
def test_q40_logits_match_reference_of_dequantized_weights(model_dir, name):
    path = make_model(model_dir, name, "q40")
    logits = dllm.load(path, sync="f32", kernels="numpy").logits(TOKENS)   # float inputs
    ok = True
    if WORLD.is_root:
        weights = q40_roundtrip(random_weights(CONFIGS[name], 0))
        ok = relative_error(logits, reference_logits(weights, CONFIGS[name], TOKENS)) <= 1e-4
    assert all_ranks(ok)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_world_logits_equal_one_rank_logits_f32(model_dir, name):
    path = make_model(model_dir, name, "q40")
    world = dllm.load(path, sync="f32").logits(TOKENS)
    alone = dllm.load(path, Comm.self_comm(), sync="f32").logits(TOKENS)
    ok = True
    if WORLD.is_root:
        ok = relative_error(world, alone) <= 1e-5
    assert all_ranks(ok)


def test_q80_sync_bounded_error_and_same_greedy_tokens(model_dir):
    path = make_model(model_dir, "gqa", "q40", seed=1)
    world = dllm.load(path, sync="q80")
    alone = dllm.load(path, Comm.self_comm(), sync="f32")
    q80_logits, f32_logits = world.logits(TOKENS), alone.logits(TOKENS)
    greedy_world = list(world.generate(TOKENS[:3], 20, Sampler(0.0), stop_at_eos=False))
    greedy_alone = list(alone.generate(TOKENS[:3], 20, Sampler(0.0), stop_at_eos=False))
    ok = greedy_world == greedy_alone and len(greedy_world) == 20
    if WORLD.is_root:
        error = relative_error(q80_logits, f32_logits)
        ok = ok and 0 < error <= 0.05
    assert all_ranks(ok)


def test_residual_stream_identical_on_every_rank(model_dir):
    path = make_model(model_dir, "gqa", "q40")
    for sync in ("q80", "f32"):
        model = dllm.load(path, sync=sync)
        model.logits(TOKENS)
        residuals = WORLD.allgather(model.state.residual.tobytes())
        assert all(r == residuals[0] for r in residuals)


def test_same_seed_same_text_at_any_world_size(model_dir):
    path = make_model(model_dir, "gqa", "q40")
    world = dllm.load(path, sync="f32")
    alone = dllm.load(path, Comm.self_comm(), sync="f32")
    runs = [list(m.generate([1, 4], 24, Sampler(1.0, 0.95, seed=7), stop_at_eos=False))
            for m in (world, alone)]
    again = list(alone.generate([1, 4], 24, Sampler(1.0, 0.95, seed=7), stop_at_eos=False))
    other = list(alone.generate([1, 4], 24, Sampler(1.0, 0.95, seed=8), stop_at_eos=False))
    assert all_ranks(runs[0] == runs[1] == again and other != again)


def test_weights_from_root_equal_weights_from_file(model_dir):
    path = make_model(model_dir, "gqa", "q40")
    from_file = dllm.load(path, sync="f32")
    from_root = dllm.load(path, sync="f32", weights_from="root")
    stored = from_file.kernels.stored
    same = all(np.array_equal(stored(from_file.weights[k]), stored(from_root.weights[k]))
               for k in from_file.weights)
    logits = [from_file.logits(TOKENS), from_root.logits(TOKENS)]
    assert all_ranks(same and set(from_file.weights) == set(from_root.weights)
                     and (not WORLD.is_root or np.array_equal(*logits)))


def test_decode_one_token_at_a_time_equals_block_forward(model_dir):
    path = make_model(model_dir, "mha", "f32")
    model = dllm.load(path, sync="f32")
    block = model.logits(TOKENS)
    steps = [model.forward([t], pos, logits="last") for pos, t in enumerate(TOKENS)]
    ok = True
    if WORLD.is_root:
        ok = relative_error(np.concatenate(steps), block) <= 1e-5
    assert all_ranks(ok)


def test_bytes_per_token_equal_the_formula(model_dir):
    """Per layer each rank receives (n-1)/n of (dim + dim + hidden + dim) values as Q80
    (exactly so summed over ranks; per rank when the splits are even)."""
    path = make_model(model_dir, "gqa", "q40")
    cfg, n = CONFIGS["gqa"], WORLD.size
    model = dllm.load(path, sync="q80")
    model.forward([3], 0, logits=None)
    before = model.comm.stats.snapshot()
    model.forward([4], 1, logits=None)
    received = model.comm.stats.since(before).bytes_received
    total = cfg.n_layers * (3 * cfg.dim + cfg.hidden_dim) // 32 * 34 * (n - 1) + (n - 1) * cfg.dim * 4
    assert all_ranks(sum(WORLD.allgather(received)) == total)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("sync", ["f32", "q80"])
def test_fast_kernels_against_numpy_kernels_and_the_reference(model_dir, name, sync):
    """The whole model on the fast backend. Decoding (inputs as Q8_0, integer block dots)
    agrees with the float reference of the dequantized weights to Q8_0 rounding (f32 sync).
    Prefill, where the C kernel runs, is that same arithmetic: the prompt's logits equal
    those of decoding it token by token, bit for bit; without it, prefill (float32 inputs
    times dequantized tiles) agrees with the numpy backend to float rounding."""
    pytest.importorskip("numba", reason="numba is not installed (dllm[fast])")
    from dllm.kernels_fast import gemm_isa
    path = make_model(model_dir, name, "q40")
    runs = {}
    for kernels in ("fast", "numpy"):
        model = dllm.load(path, sync=sync, kernels=kernels, prefill_chunk=4)
        block = model.logits(TOKENS)
        steps = [model.forward([t], pos) for pos, t in enumerate(TOKENS)]
        runs[kernels] = block, None if block is None else np.concatenate(steps)
    ok = True
    if WORLD.is_root:
        expected = reference_logits(q40_roundtrip(random_weights(CONFIGS[name], 0)),
                                    CONFIGS[name], TOKENS)
        (fast_block, fast_steps), (numpy_block, numpy_steps) = runs["fast"], runs["numpy"]
        if gemm_isa():
            ok = np.array_equal(fast_block, fast_steps)
        else:
            ok = relative_error(fast_block, numpy_block) <= (1e-5 if sync == "f32" else 0.03)
        if sync == "f32":
            errors = [relative_error(numpy_steps, expected), relative_error(fast_steps, expected)]
            ok &= errors[0] <= 1e-4 and 0 < errors[1] <= 0.03
    assert all_ranks(ok)


def test_fast_prefill_of_a_long_prompt_equals_its_decode_bit_for_bit():
    """200 tokens in blocks of 16 against one token at a time, on the demo model: with the C
    kernel and the row-wise attention no row's numbers depend on the rows beside it (the
    batched float attention differed from position 47 on: float rounding that Q8_0 inputs
    then turn into whole code steps)."""
    pytest.importorskip("numba", reason="numba is not installed (dllm[fast])")
    from dllm.kernels_fast import gemm_isa
    if gemm_isa() is None:
        pytest.skip("the C kernel dllm._gemm_q40_q80 is not built or no AVX2")
    model = dllm.load(dllm.demo_model(), sync="q80", kernels="fast", prefill_chunk=16)
    ids = [int(t) for t in np.random.default_rng(0).integers(1, 500, 200)]
    block = model.logits(ids)
    steps = [model.forward([t], pos) for pos, t in enumerate(ids)]
    assert all_ranks(not WORLD.is_root or np.array_equal(block, np.concatenate(steps)))


@pytest.mark.parametrize("quant", NAMES)
def test_every_weight_type_runs_in_both_modes_and_both_payloads(model_dir, quant):
    """Every type of the table, tensor and pipeline mode, f32 and Q80 sync, decode and
    prefill, on the default kernels: f32 sync on the numpy kernels equals the reference of
    the file's dequantized weights to float rounding; the rest to Q8_0 rounding."""
    cfg = CONFIGS["tied"]
    path = make_model(model_dir, "tied", quant)
    modes = ["tensor"] + (["pipeline"] if WORLD.size <= cfg.n_layers else [])
    runs = {}
    for mode in modes:
        for sync, kernels in (("f32", "numpy"), ("q80", None)):
            model = dllm.load(path, sync=sync, parallel=mode, kernels=kernels,
                              prefill_chunk=4)
            block = model.logits(TOKENS)
            steps = [model.forward([t], pos) for pos, t in enumerate(TOKENS[:4])]
            runs[mode, sync] = (block, None if block is None else np.concatenate(steps),
                                model.quant)
    ok = True
    if WORLD.is_root:
        t = TYPES[quant]
        weights = {k: t.dequantize(t.quantize(v)) if v.ndim == 2 else v
                   for k, v in random_weights(cfg, 0).items()}
        expected = reference_logits(weights, cfg, TOKENS)
        for (mode, sync), (block, steps, described) in runs.items():
            bound = 1e-4 if sync == "f32" else 0.05
            errors = (relative_error(block, expected), relative_error(steps, expected[:4]))
            ok &= described == quant and max(errors) <= bound
            print(quant, mode, sync, errors)
    assert all_ranks(ok)
