"""dllm.serve: the paged KV cache and batched forward against the contiguous reference, the
scheduler (chunked prefill, preemption), and the HTTP server driven by the real openai
client against mpirun -n 1, 2 and 4.

Batching must change nothing: every row of a batched forward is computed as the same row of
a single-sequence forward (kvcache.RowSegments), so the comparisons below are exact.
"""
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import dllm
from dllm.backend import fast_available, make as make_kernels
from dllm.comm import Comm
from dllm.generate import default_model
from dllm.kernels import attention
from dllm.kvcache import BlockAllocator, BlockPool, PagedStep, paged_attention
from dllm.serve.api import StopText
from dllm.serve.chat import ChatFormat
from dllm.serve.sampling import RequestSampler
from dllm.serve.scheduler import Scheduler, Sequence, token_logprob

from conftest import make_model

BIN = Path(sys.executable).parent
KERNELS = ["numpy"] + (["fast"] if fast_available() else [])
needs_server = pytest.mark.skipif(
    shutil.which("mpirun", path=str(BIN)) is None or not all(
        __import__("importlib").util.find_spec(m) for m in ("starlette", "uvicorn", "openai")),
    reason="needs the serve extra (starlette, uvicorn), openai and mpirun in the venv")


# --- the paged cache against the contiguous one ----------------------------------------------

def test_paged_attention_equals_contiguous():
    rng = np.random.default_rng(0)
    KV, H, hd, B, S, T = 2, 6, 8, 16, 37, 5
    head_kv = np.arange(H) // 3
    k, v = rng.standard_normal((2, KV, S, hd)).astype(np.float32)
    table = [7, 2, 5]                                     # blocks out of order
    k_blocks = rng.standard_normal((9, KV, B, hd)).astype(np.float32)   # garbage elsewhere
    v_blocks = rng.standard_normal((9, KV, B, hd)).astype(np.float32)
    for i, b in enumerate(table):
        n = min(B, S - i * B)
        k_blocks[b, :, :n], v_blocks[b, :, :n] = k[:, i * B:i * B + n], v[:, i * B:i * B + n]
    q = rng.standard_normal((T, H, hd)).astype(np.float32)
    want = attention(q, k, v, S - T, head_kv)
    got = paged_attention(q, k_blocks, v_blocks, table, S - T, head_kv)
    assert np.array_equal(got, want)


def test_allocator_grows_and_frees():
    alloc = BlockAllocator(4)
    table = []
    assert alloc.grow(table, 17) and table == [0, 1]
    assert alloc.grow(table, 32) and len(table) == 2          # still two blocks
    assert not alloc.grow(table, 80) and len(table) == 2      # five would not fit
    alloc.release(table)
    assert table == [] and alloc.used == 0


@pytest.mark.skipif(not fast_available(), reason="needs numba (the fast backend)")
def test_rows_kernel_equals_decode_kernel():
    from dllm import kernels_fast as kf
    from dllm.quant import quantize_q40
    rng = np.random.default_rng(1)
    w = kf.pack_q40(quantize_q40(rng.standard_normal((200, 96)).astype(np.float32)))
    x = rng.standard_normal((5, 96)).astype(np.float32)
    x[2] = 0                                                  # an all-zero row
    rows = kf.matmul_rows(kf.Q80Rows(x), w)
    for t in range(len(x)):
        assert np.array_equal(rows[t], kf.matmul(kf.quantize_input(x[t:t + 1]), w)[0])


def greedy_alone(model, prompt, steps):
    return list(model.generate(prompt, steps, dllm.Sampler(), stop_at_eos=False))


def drive(model, scheduler, pool):
    """engine.run on one rank until every submitted sequence has finished."""
    while scheduler.running or scheduler.waiting:
        plan = scheduler.next_plan(idle_timeout=0)
        if plan is None:
            break
        step = PagedStep(pool, plan.segments, model.head_kv, model.kernels)
        wants = any(kind is not None for *_, kind in plan.segments)
        scheduler.complete(plan, model.forward(plan.tokens, 0, "plan" if wants else None,
                                               step=step))


def submit(scheduler, prompts, steps, sampler=lambda i: dllm.Sampler(), **kw):
    outputs = [[] for _ in prompts]
    events = [[] for _ in prompts]
    for i, p in enumerate(prompts):
        def emit(kind, payload, i=i):
            events[i].append((kind, payload))
            if kind == "token":
                outputs[i].append(payload[0])
        assert scheduler.submit(Sequence(list(p), steps, sampler(i), emit, **kw))
    return outputs, events


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("quant", ["q40", "f32"])
def test_batched_forward_equals_alone(model_dir, kernels, quant):
    """Sequences sharing forwards (chunked prefill beside decodes, prompts longer than a
    chunk) get exactly the tokens they get alone, at their own positions."""
    path = make_model(model_dir, "gqa", quant)
    model = dllm.load(path, Comm.self_comm(), sync="f32", kernels=kernels, prefill_chunk=8)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, 96, n).tolist() for n in (3, 11, 20, 1, 8)]
    alone = [greedy_alone(model, p, 12) for p in prompts]
    pool = BlockPool(2, model.shard.n_kv_heads, model.config.head_dim, 40, block_size=4)
    scheduler = Scheduler(40, model.max_seq_len, 8, max_running=8, max_queue=8,
                          block_size=4)
    outputs, _ = submit(scheduler, prompts, 12)
    drive(model, scheduler, pool)
    assert outputs == alone
    assert scheduler.allocator.used == 0


def test_preemption_gives_identical_tokens(model_dir):
    """A pool too small for all sequences at once: the newest are preempted and recomputed,
    and every sequence still gets its own greedy tokens (and seeded samples)."""
    path = make_model(model_dir, "mha", "q40")
    model = dllm.load(path, Comm.self_comm(), sync="f32", prefill_chunk=4)
    prompts = [[5 + i, 7, 9, 11 + i, 13] for i in range(4)]

    def seeded(i):
        return RequestSampler(temperature=0.9, top_k=20, seed=10 + i)
    alone = [list(model.generate(p, 20, seeded(i), stop_at_eos=False))
             for i, p in enumerate(prompts)]
    pool = BlockPool(2, model.shard.n_kv_heads, model.config.head_dim, 16, block_size=4)
    scheduler = Scheduler(16, model.max_seq_len, 4, max_running=4, max_queue=8,
                          block_size=4)
    from dllm.serve.metrics import Metrics
    scheduler.metrics = Metrics()
    outputs, _ = submit(scheduler, prompts, 20, seeded)
    drive(model, scheduler, pool)
    assert scheduler.metrics.preemptions > 0
    assert outputs == alone


def test_echo_logprobs_equal_model_logits(model_dir):
    path = make_model(model_dir, "gqa", "q40")
    model = dllm.load(path, Comm.self_comm(), sync="f32", prefill_chunk=8)
    prompt = list(range(3, 23))
    logits = model.logits(prompt).astype(np.float64)
    log_probs = logits - logits.max(axis=1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(axis=1, keepdims=True))
    want = [log_probs[i - 1, prompt[i]] for i in range(1, len(prompt))]
    pool = BlockPool(2, model.shard.n_kv_heads, model.config.head_dim, 20, block_size=4)
    scheduler = Scheduler(20, model.max_seq_len, 8, 4, 4, block_size=4)
    _, events = submit(scheduler, [prompt], 0, logprobs=1, echo_logprobs=True)
    drive(model, scheduler, pool)
    got = [lp for kind, payload in events[0] if kind == "prompt_logprobs"
           for lp, _ in payload]
    assert got[0] is None and got[1:] == pytest.approx(want, abs=0, rel=1e-12)
    assert events[0][-1] == ("done", "length")


def test_token_logprob_and_sampler_filters():
    logits = np.array([1.0, 3.0, 2.0, -1.0])
    lp, top = token_logprob(logits, 2, 2)
    assert [i for i, _ in top] == [1, 2] and lp == pytest.approx(top[1][1])
    assert np.exp([token_logprob(logits, i, 0)[0] for i in range(4)]).sum() == pytest.approx(1)
    picks = {RequestSampler(temperature=1.0, top_k=2, seed=s).sample(logits) for s in range(50)}
    assert picks == {1, 2}
    picks = {RequestSampler(temperature=1.0, min_p=0.5, seed=s).sample(logits)
             for s in range(50)}
    assert picks == {1}                       # p(2) / p(1) = 1/e < min_p
