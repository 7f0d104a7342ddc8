"""dllm.serve: the paged KV cache and batched forward against the contiguous reference, the
scheduler (chunked prefill, preemption), and the HTTP server driven by the real openai
client against mpirun -n 1, 2 and 4.

Batching must change nothing: every row of a batched forward is computed as the same row of
a single-sequence forward (kvcache.RowSegments), so the comparisons below are exact.
"""
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
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import dllm
from dllm.backend import fast_available, make as make_kernels
from dllm.comm import Comm

from dllm.kernels import attention
from dllm.kvcache import BlockAllocator, BlockPool, PagedStep, paged_attention
from dllm.serve.api import StopText
from dllm.serve.chat import ChatFormat
from dllm.serve.sampling import RequestSampler
from dllm.serve.scheduler import Scheduler, Sequence, token_logprob

from conftest import make_model
from test_faults import SLACK, launcher_is_hydra, rank_pid

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
    rows = kf.matmul_rows(kf.Q80Input(x), w)
    for t in range(len(x)):
        assert np.array_equal(rows[t], kf.matmul(kf.quantize_input(x[t:t + 1]), w)[0])


def greedy_alone(model, prompt, steps):
    return list(model.generate(prompt, steps, dllm.Sampler(), stop_at_eos=False))


def c_kernel_runs():
    if not fast_available():
        return False
    from dllm.kernels_fast import gemm_isa
    return gemm_isa() is not None


def drive(model, scheduler, pool, merged=False):
    """engine.run on one rank until every submitted sequence has finished."""
    while scheduler.running or scheduler.waiting:
        plan = scheduler.next_plan(idle_timeout=0)
        if plan is None:
            break
        step = PagedStep(pool, plan.segments, model.head_kv, model.kernels, merged)
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
@pytest.mark.parametrize("merged", [False, True])
def test_batched_forward_equals_alone(model_dir, kernels, quant, merged):
    """Sequences sharing forwards (chunked prefill beside decodes, prompts longer than a
    chunk) get exactly the tokens they get alone, at their own positions. merged
    (--batching fast: every row of an iteration in one product) is exact too on Q4_0 weights
    with the C kernel, whose rows' integer products and attention are each their own."""
    if merged and not (quant == "q40" and kernels == "fast" and c_kernel_runs()):
        pytest.skip("merged rows are exact on Q4_0 with the C kernel only")
    path = make_model(model_dir, "gqa", quant)
    model = dllm.load(path, Comm.self_comm(), sync="f32", kernels=kernels, prefill_chunk=8)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, 96, n).tolist() for n in (3, 11, 20, 1, 8)]
    alone = [greedy_alone(model, p, 12) for p in prompts]
    pool = BlockPool(2, model.shard.n_kv_heads, model.config.head_dim, 40, block_size=4)
    scheduler = Scheduler(40, model.max_seq_len, 8, max_running=8, max_queue=8,
                          block_size=4)
    outputs, _ = submit(scheduler, prompts, 12)
    drive(model, scheduler, pool, merged)
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


def test_kv_gauge_counts_the_positions_being_written():
    """/metrics' live tokens are the positions the running sequences have written or the
    plan in flight writes: blocks of 4 for prompts of 5 and 3 hold 12 positions for 8."""
    scheduler = Scheduler(40, 64, 8, max_running=4, max_queue=8, block_size=4)
    submit(scheduler, [[5, 7, 9, 11, 13], [6, 8, 10]], 4)
    plan = scheduler.next_plan()
    assert len(plan.tokens) == 8
    assert scheduler.snapshot() == (0, 2, 3, 37, 4, 8)   # queued, running, used, free, B, live


def test_full_context_ends_as_generate_does(model_dir):
    path = make_model(model_dir, "mha", "q40")
    model = dllm.load(path, Comm.self_comm(), sync="f32", prefill_chunk=16)
    prompt = list(range(3, 3 + model.max_seq_len - 2))
    alone = greedy_alone(model, prompt, 10)                  # the context ends it: 3 tokens
    pool = BlockPool(2, model.shard.n_kv_heads, model.config.head_dim, 12, block_size=4)
    scheduler = Scheduler(12, model.max_seq_len, 16, 2, 2, block_size=4)
    outputs, events = submit(scheduler, [prompt], 10)
    drive(model, scheduler, pool)
    assert outputs[0] == alone and len(alone) == 3
    assert events[0][-1] == ("done", "length")


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


def test_stop_text_holds_back_a_possible_stop():
    st = StopText(["END", "\n\n"])
    assert st.add("Hello E") == ("Hello ", False)
    assert st.add("N") == ("", False)
    assert st.add("Dless") == ("", True) and st.text == "Hello "
    st = StopText(["xyz"])
    assert st.add("ab x") == ("ab ", False) and st.flush() == "x"


def test_chat_template_rendered_with_specials():
    """A stored Jinja template (ChatML-like, Mistral-like) renders as Hugging Face does, and
    the special tokens in it become their ids, not text."""
    tok = dllm.load(dllm.demo_model(), Comm.self_comm()).tokenizer
    mistral = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
               "{{ m['content'] }} [/INST]{% else %}{{ m['content'] }}{{ eos_token }}"
               "{% endif %}{% endfor %}")
    chat = ChatFormat(tok, None, mistral)
    ids = chat.prompt_ids([{"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "yo"},
                           {"role": "user", "content": "go"}])
    eos = tok.eos_id
    assert ids[0] == tok.bos_id and ids.count(eos) == 1 and ids.count(tok.bos_id) == 1
    assert tok.decode(ids).startswith("[INST] hi [/INST]yo")
    assert eos in chat.stop_ids
    with pytest.raises(dllm.DllmError):
        ChatFormat(tok, None, None).prompt_ids([{"role": "user", "content": "x"}])


# --- the server under mpirun, through the openai client -------------------------------------

TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
            "{{ m['content'] }} [/INST]{% elif m['role'] == 'assistant' %}{{ m['content'] }}"
            "{{ eos_token }}{% endif %}{% endfor %}")
PROMPTS = ["Once upon a time", "The dog", "Lily and Tom went to the", "One day, a bird",
           "Sam had a big red ball. He", "The sun was", "Mom said", "There was a small cat"]


class Server:
    """mpirun [launcher flags] -n N python -m dllm.serve ... --port 0 (a later --port in args
    wins), as a subprocess in a session of its own; .url once listening."""

    def __init__(self, ranks, model, *args, timeout=240, launcher=()):
        cmd = [str(BIN / "mpirun"), *launcher, "-n", str(ranks), sys.executable, "-m",
               "dllm.serve", "--model", str(model), "--port", "0", "--sync", "f32", *args]
        env = dict(os.environ, PYTHONPATH=str(Path(dllm.__file__).parents[1]))
        # stdout too: the launcher's banners go there (dllm.serve writes nothing on it)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env, start_new_session=True)
        self.lines, self.url = [], None
        found = threading.Event()

        def read():
            for line in self.proc.stdout:
                self.lines.append(line)
                match = re.search(r"listening on (http://\S+)", line)
                if match:
                    self.url = match.group(1)
                    found.set()
            found.set()
        threading.Thread(target=read, daemon=True).start()
        if not found.wait(timeout) or self.url is None:
            self.close()
            raise AssertionError("the server did not start:\n" + "".join(self.lines))

    def client(self, **kw):
        import openai
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"),
                             max_retries=0, timeout=120, **kw)

    def request(self, path, body=None, headers=None, raw=None):
        """(status, parsed JSON or text, headers) of a plain HTTP request."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                status, text, h = r.status, r.read().decode(), r.headers
        except urllib.error.HTTPError as e:
            status, text, h = e.code, e.read().decode(), e.headers
        try:
            return status, json.loads(text), h
        except ValueError:
            return status, text, h

    def metrics(self):
        _, text, _ = self.request("/metrics")
        return {m.group(1): float(m.group(2))
                for m in re.finditer(r"^(dllm_[a-z_]+) ([0-9.e+-]+)$", text, re.M)}

    def close(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)      # our own session: mpirun and ranks
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(20)


def declared_too_large(server):
    """The status of a POST that declares a 2 MiB body and sends none of it: the server
    must answer from Content-Length alone (sending the body races its early 413 and close)."""
    import socket
    from urllib.parse import urlsplit
    url = urlsplit(server.url)
    with socket.create_connection((url.hostname, url.port), timeout=60) as conn:
        conn.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {url.hostname}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {2 << 20}\r\n"
                     f"\r\n".encode())
        status_line = conn.makefile("rb").readline().decode()
    return int(status_line.split()[1])


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """The demo model with a Jinja chat template stored, as a converted HF model has."""
    import h5py
    path = tmp_path_factory.mktemp("serve") / "demo-chat.h5"
    shutil.copy(dllm.demo_model(), path)
    with h5py.File(path, "r+") as f:
        f["tokenizer"].attrs["chat_template_jinja"] = TEMPLATE
    return path


@pytest.fixture(scope="module")
def reference():
    """The demo model on one rank, f32 sync: what dllm.generate computes."""
    return dllm.load(dllm.demo_model(), Comm.self_comm(), sync="f32")


@pytest.fixture(scope="module")
def server2(chat_model):
    server = Server(2, chat_model)
    yield server
    server.close()


def ref_text(model, prompt, steps, sampler=None, ids=None):
    """The reply's text as the server spells it: what the tokens add to the prompt's."""
    ids = ids or model.tokenizer.encode(prompt, bos=True)
    out = list(model.generate(ids, steps, sampler or dllm.Sampler(), stop_at_eos=True))
    out = [t for t in out if t != model.config.eos_id]
    return model.tokenizer.decode(ids + out)[len(model.tokenizer.decode(ids)):]


@needs_server
def test_openai_client_completions_and_chat(server2, reference):
    client = server2.client()
    assert [m.id for m in client.models.list().data] == ["demo-chat"]
    want = ref_text(reference, PROMPTS[0], 24)
    done = client.completions.create(model="demo-chat", prompt=PROMPTS[0], max_tokens=24,
                                     temperature=0)
    assert done.choices[0].text == want and done.usage.completion_tokens == 24
    pieces = list(client.completions.create(model="demo-chat", prompt=PROMPTS[0],
                                            max_tokens=24, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == want
    assert pieces[-1].choices[0].finish_reason == "length"

    messages = [{"role": "user", "content": "Tell me a story."}]
    ids = reference.tokenizer.encode("[INST] Tell me a story. [/INST]", bos=True)
    chat_want = ref_text(reference, None, 16, ids=ids)
    reply = client.chat.completions.create(model="demo-chat", messages=messages,
                                           max_tokens=16, temperature=0)
    assert reply.choices[0].message.content == chat_want
    chunks = list(client.chat.completions.create(model="demo-chat", messages=messages,
                                                 max_tokens=16, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat_want
    lp = client.chat.completions.create(model="demo-chat", messages=messages, max_tokens=4,
                                        temperature=0, logprobs=True, top_logprobs=2)
    content = lp.choices[0].logprobs.content
    assert len(content) == 4 and all(c.top_logprobs[0].logprob >= c.logprob - 1e-12
                                     for c in content)
    stopped = client.completions.create(model="demo-chat", prompt=PROMPTS[0], max_tokens=24,
                                        temperature=0, stop=[" girl"])
    assert stopped.choices[0].text == want.split(" girl")[0]
    assert stopped.choices[0].finish_reason == "stop"


@needs_server
def test_batching_changes_nothing(server2, reference):
    """8 concurrent greedy requests get exactly their tokens alone and dllm.generate's; with
    a seed, the same sampled text."""
    client = server2.client()

    def ask(i, **kw):
        return client.completions.create(model="m", prompt=PROMPTS[i], max_tokens=20,
                                         **kw).choices[0].text
    greedy = [ref_text(reference, p, 20) for p in PROMPTS]
    seeded = [ref_text(reference, p, 20, dllm.Sampler(0.8, 0.95, seed=i))
              for i, p in enumerate(PROMPTS)]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda i: ask(i, temperature=0), range(8)))
        sampled = list(pool.map(lambda i: ask(i, temperature=0.8, top_p=0.95, seed=i),
                                range(8)))
    assert together == greedy
    assert sampled == seeded
    assert [ask(i, temperature=0) for i in (2, 5)] == [greedy[2], greedy[5]]
    printed = subprocess.run(
        [sys.executable, "-m", "dllm.generate", "--sync", "f32", "--prompt", PROMPTS[2],
         "--steps", "20", "--quiet"], capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=str(Path(dllm.__file__).parents[1])))
    assert printed.stdout.rstrip("\n") == PROMPTS[2] + greedy[2]


@needs_server
def test_echo_logprobs_equal_logits_through_the_api(server2, reference):
    """lm-evaluation-harness' local-completions request: echo, logprobs, max_tokens 0."""
    status, body, _ = server2.request("/v1/completions", {
        "model": "m", "prompt": PROMPTS[4], "max_tokens": 0, "echo": True, "logprobs": 1,
        "temperature": 0})
    assert status == 200
    lp = body["choices"][0]["logprobs"]
    ids = reference.tokenizer.encode(PROMPTS[4], bos=True)
    logits = reference.logits(ids).astype(np.float64)
    log_probs = logits - logits.max(axis=1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(axis=1, keepdims=True))
    assert lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == len(ids)
    # exact at one rank (test_echo_logprobs_equal_model_logits); two ranks' prefill gemms
    # over other row slices round differently, by float32 ulps
    assert lp["token_logprobs"][1:] == pytest.approx(
        [log_probs[i - 1, ids[i]] for i in range(1, len(ids))], abs=2e-5)
    assert body["choices"][0]["text"] == PROMPTS[4]
    assert "".join(lp["tokens"]) == PROMPTS[4]


@needs_server
def test_bad_requests_answer_4xx(server2):
    def status(body=None, raw=None, path="/v1/completions"):
        code, answer, _ = server2.request(path, body, raw=raw)
        assert isinstance(answer, dict) and set(answer["error"]) == {"message", "type",
                                                                     "param", "code"}
        return code, answer["error"]
    assert status(raw=b'{"prompt": "x", ')[0] == 400
    assert status({"prompt": "x", "temperature": "hot"})[1]["param"] == "temperature"
    assert status({"prompt": "x", "n": 2})[0] == 400
    assert status({"prompt": "x", "max_tokens": -1})[0] == 400
    assert status({"prompt": [1, 99999]})[0] == 400
    assert status({"prompt": "word " * 400})[1]["code"] == "context_length_exceeded"
    assert status({"messages": [{"role": "king", "content": "x"}]},
                  path="/v1/chat/completions")[0] == 400
    assert declared_too_large(server2) == 413
    assert status({}, path="/v1/nothing")[0] == 404


@needs_server
def test_load_with_disconnects_and_malformed(server2, reference):
    """200 requests from 32 clients, some hanging up mid-stream, some malformed: no 5xx, the
    pool back to empty, and the ranks still in step (a greedy request still exact)."""
    import http.client
    from urllib.parse import urlparse
    host, port = urlparse(server2.url).hostname, urlparse(server2.url).port
    rng = np.random.default_rng(7)
    kinds = rng.choice(["plain", "stream", "hangup", "malformed"], 200, p=[.45, .25, .2, .1])

    def one(i):
        conn = http.client.HTTPConnection(host, port, timeout=120)
        kind = kinds[i]
        body = {"prompt": PROMPTS[i % 8], "max_tokens": int(4 + i % 12), "temperature": 0.5,
                "seed": i, "stream": kind != "plain"}
        data = b'{"prompt": [' if kind == "malformed" else json.dumps(body).encode()
        conn.request("POST", "/v1/completions", data, {"Content-Type": "application/json"})
        r = conn.getresponse()
        if kind == "hangup":
            r.read(1)
            conn.sock.shutdown(2)
            conn.close()
            return r.status, kind
        r.read()
        conn.close()
        return r.status, kind
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(200)))
    assert all(s < 500 for s, _ in results)
    assert all(s == 400 for s, k in results if k == "malformed")
    assert all(s == 200 for s, k in results if k != "malformed")
    deadline = time.time() + 10
    while time.time() < deadline:
        m = server2.metrics()
        if m["dllm_running_sequences"] == 0 and m["dllm_kv_blocks_used"] == 0:
            break
        time.sleep(0.2)
    assert m["dllm_running_sequences"] == 0 and m["dllm_kv_blocks_used"] == 0
    assert m["dllm_queue_depth"] == 0
    text = server2.client().completions.create(model="m", prompt=PROMPTS[3], max_tokens=20,
                                               temperature=0).choices[0].text
    assert text == ref_text(reference, PROMPTS[3], 20)


@needs_server
def test_small_pool_queue_limit_and_api_key(chat_model):
    """One rank, a pool of 4 blocks for contexts of 64: sequences are preempted and
    recomputed yet every reply is exact; a full queue answers 429 with Retry-After; the
    API key is checked."""
    server = Server(1, chat_model, "--max-seq-len", "64", "--kv-blocks", "4",
                    "--max-running", "3", "--max-queue", "2", "--api-key", "sesame")
    try:
        reference = dllm.load(dllm.demo_model(), Comm.self_comm(), sync="f32", max_seq_len=64)
        assert server.request("/v1/models")[0] == 401
        assert server.request("/health")[0] == 200
        client = server.client(api_key="sesame")

        def ask(i):
            try:
                return client.completions.create(
                    model="m", prompt=PROMPTS[i % 8], max_tokens=24,
                    temperature=0).choices[0].text
            except Exception as exc:               # openai.RateLimitError
                return exc
        with ThreadPoolExecutor(10) as pool:
            replies = list(pool.map(ask, range(10)))
        import openai
        limited = [r for r in replies if isinstance(r, openai.RateLimitError)]
        assert limited and limited[0].response.headers["retry-after"] == "1"
        for i, r in enumerate(replies):
            if isinstance(r, str):
                assert r == ref_text(reference, PROMPTS[i % 8], 24)
        assert server.metrics()["dllm_preemptions_total"] > 0
    finally:
        server.close()


# --- pipeline mode: plans in flight fill the stages ------------------------------------------

def test_plans_in_flight_share_the_running_sequences():
    """Pipeline mode's scheduling: a plan leaves out the sequences in flight and takes its
    share of the others (groups), and says "nothing now" rather than waiting while all of
    them are in flight."""
    scheduler = Scheduler(64, 64, 8, max_running=4, max_queue=8, block_size=4)
    submit(scheduler, [[5, 6, 7]] * 4, 3)
    first = scheduler.next_plan(groups=2)
    second = scheduler.next_plan(busy=set(first.seq_ids), groups=2)
    assert len(first.seq_ids) == len(second.seq_ids) == 2
    assert not set(first.seq_ids) & set(second.seq_ids)
    idle = scheduler.next_plan(busy=set(first.seq_ids + second.seq_ids), groups=2)
    assert idle.tokens == [] and idle.seq_ids == []


FAULTS_MARKER = f"faults-{uuid.uuid4().hex[:8]}"     # in the fault test's rank processes
FAULTS_TIMEOUT = 3                                   # --timeout of the stalled job
FAULTS_LAUNCHER = ("-disable-auto-cleanup",) if launcher_is_hydra() else ()


@pytest.fixture(scope="module")
def numpy_reference():
    """The demo model on one rank, f32 sync, numpy kernels."""
    return dllm.load(dllm.demo_model(), Comm.self_comm(), sync="f32", kernels="numpy")


@pytest.fixture(scope="module")
def pipeline2(chat_model):
    """2 pipeline stages on the numpy kernels (test_mmlu_through_the_api_equals_dllm_eval
    says why), launched with the fault test's options: that test, the module's last, kills
    one of its ranks."""
    server = Server(2, chat_model, "--parallel", "pipeline", "--kernels", "numpy",
                    "--model-name", FAULTS_MARKER, "--timeout", str(FAULTS_TIMEOUT),
                    launcher=FAULTS_LAUNCHER)
    yield server
    server.close()


@needs_server
def test_pipeline_serving_equals_generate(pipeline2, numpy_reference):
    """--parallel pipeline on 2 ranks: 8 concurrent greedy requests, shared among the two
    stages as plans in flight, each get exactly the tokens dllm.generate --parallel
    pipeline prints (and a tensor-parallel run's); a seeded sample, a streamed chat reply
    and echo log-probabilities as well."""
    reference, cfg = numpy_reference, numpy_reference.config
    # root's stage holds half the layers and only their part of the 256 blocks (k, v float32)
    held = 256 * (cfg.n_layers // 2) * cfg.n_kv_heads * 16 * cfg.head_dim * 2 * 4
    assert f"256 KV blocks of 16 per rank, {held / 2 ** 20:.1f} MiB" in pipeline2.lines[0]
    client = pipeline2.client()
    greedy = [ref_text(reference, p, 20) for p in PROMPTS]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: client.completions.create(
            model="m", prompt=p, max_tokens=20, temperature=0).choices[0].text, PROMPTS))
    assert together == greedy
    seeded = client.completions.create(model="m", prompt=PROMPTS[1], max_tokens=20,
                                       temperature=0.8, top_p=0.95, seed=1).choices[0].text
    assert seeded == ref_text(reference, PROMPTS[1], 20, dllm.Sampler(0.8, 0.95, seed=1))
    pieces = list(client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=16,
        temperature=0, stream=True))
    ids = reference.tokenizer.encode("[INST] Tell me a story. [/INST]", bos=True)
    assert "".join(c.choices[0].delta.content or "" for c in pieces) == ref_text(
        reference, None, 16, ids=ids)
    echo = client.completions.create(model="m", prompt=PROMPTS[4], max_tokens=0, echo=True,
                                     logprobs=1)
    ids = reference.tokenizer.encode(PROMPTS[4], bos=True)
    logits = reference.logits(ids)
    want = [token_logprob(logits[i - 1], ids[i], 0)[0] for i in range(1, len(ids))]
    assert echo.choices[0].logprobs.token_logprobs[1:] == pytest.approx(want, abs=2e-5)
    printed = subprocess.run(
        [str(BIN / "mpirun"), "-n", "2", sys.executable, "-m", "dllm.generate", "--parallel",
         "pipeline", "--sync", "f32", "--kernels", "numpy", "--prompt", PROMPTS[6], "--steps",
         "20", "--quiet"],
        capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=str(Path(dllm.__file__).parents[1])))
    assert printed.stdout.rstrip("\n") == PROMPTS[6] + greedy[6]


# --- MMLU through the API, as lm-evaluation-harness' local-completions scores it ----------------

MMLU = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mmlu"


def lm_eval_loglikelihood(client, tokenizer, context, continuation):
    """lm-eval's local-completions loglikelihood request (lm_eval 0.4: models/api_models.py
    _encode_pair and openai_completions.py, with tokenized_requests and add_bos_token):
    the context's ids and what the whole text's add to them, sent as one id list with echo,
    logprobs 1 and max_tokens 1; the score is the sum of the continuation ids'
    log-probabilities, the one generated token (the last) left out."""
    context_ids = tokenizer.encode(context, bos=True)
    continuation_ids = tokenizer.encode(context + continuation, bos=True)[len(context_ids):]
    reply = client.completions.create(model="m", prompt=[context_ids + continuation_ids],
                                      temperature=0, max_tokens=1, logprobs=1, seed=1234,
                                      echo=True)
    lp = reply.choices[0].logprobs
    ctxlen = len(context_ids)
    assert len(lp.token_logprobs) == ctxlen + len(continuation_ids) + 1
    return sum(lp.token_logprobs[ctxlen:-1]), continuation_ids


@needs_server
def test_mmlu_through_the_api_equals_dllm_eval(pipeline2, numpy_reference):
    """A handful of MMLU questions scored as lm-eval's local-completions scores them
    through the server give dllm.eval mmlu's log-likelihoods (evaluate.score_prompts) and
    so its choices; the continuations are the same ids as dllm.eval's choice_tokens.

    The server computes a prompt and its choice as one sequence of forwards, dllm.eval
    cuts them otherwise (prefix reuse, the choice's first id as a decoding step): both on
    the numpy kernels, whose rounding differences between the two cuts stay at float32's
    on every machine (the fast kernels' are none where their C GEMM runs, AVX2, but reach
    Q8_0 steps, 1e-2, where their prefill falls back to float32 BLAS)."""
    reference = numpy_reference
    from dllm import evaluate
    if not (MMLU / "test").is_dir():
        pytest.skip(f"{MMLU} is absent (the real MMLU data lives in ../shared)")
    tok, subject = reference.tokenizer, "high_school_geography"
    _, questions = evaluate.read_subject(MMLU, subject, 0, limit=4)
    continuations = evaluate.choice_tokens(tok)
    budget = evaluate.prompt_budget(reference.max_seq_len, continuations)
    prompts = [evaluate.build_prompt(tok, subject, [], q, 0, budget) for q in questions]
    assert not any(p.truncated for p in prompts)
    want, _ = evaluate.score_prompts(reference, [p.ids for p in prompts], continuations)
    client = pipeline2.client()
    for q, scores in zip(questions, want):
        context = evaluate.prompt_text(subject, [], q, 0)
        got = []
        for letter in evaluate.LETTERS:
            score, ids = lm_eval_loglikelihood(client, tok, context, " " + letter)
            assert ids == continuations[letter]
            got.append(score)
        assert got == pytest.approx(scores, abs=1e-4)
        assert int(np.argmax(got)) == int(np.argmax(scores))


# --- faults: a rank killed or stalled while streams are in flight; 4 ranks ----------------------
# Last in this module: it ends pipeline2's job. MPICH's -disable-auto-cleanup lets dllm's
# watchdog, not the launcher, end the job when a rank dies (docs/faults.md); the rank
# processes are found in /proc by the rank the launcher gives them (test_faults.rank_pid).

STREAMS = 3


def strike(server, sig):
    """Send sig to rank 1 of server while STREAMS streamed greedy requests are in flight;
    returns (seconds from the signal to the job's end, its exit status, what the job
    printed, the streams' outcomes: "finished" or the exception that broke one off)."""
    pid = rank_pid(FAULTS_MARKER, 1)
    assert pid is not None, "rank 1's process not found"
    client, started = server.client(), threading.Semaphore(0)

    def stream(i):
        try:
            for _ in client.completions.create(model="m", prompt=PROMPTS[i], max_tokens=250,
                                               temperature=0, stream=True,
                                               extra_body={"ignore_eos": True}):
                started.release()
            return "finished"
        except Exception as exc:           # openai's, httpx's or the socket's
            return exc
    try:
        with ThreadPoolExecutor(STREAMS) as pool:
            futures = [pool.submit(stream, i) for i in range(STREAMS)]
            for _ in range(STREAMS):       # every stream has a token: all mid-stream
                assert started.acquire(timeout=60), "a stream did not start"
            os.kill(pid, sig)
            struck = time.monotonic()
            status = server.proc.wait(FAULTS_TIMEOUT + SLACK + 30)
            seconds = time.monotonic() - struck
            outcomes = [f.result(timeout=30) for f in futures]
    finally:
        try:
            os.kill(pid, signal.SIGKILL)   # a stopped rank, whatever happened
        except ProcessLookupError:
            pass
        server.close()
    time.sleep(0.2)                        # the reader thread takes the last lines
    return seconds, status, "".join(server.lines), outcomes


@needs_server
@pytest.mark.slow
def test_a_lost_or_stalled_rank_ends_the_job_and_a_restart_serves(pipeline2, chat_model,
                                                                   reference):
    """SIGKILL of rank 1 (pipeline mode, 2 ranks) mid-stream: the streams break off, the job
    ends non-zero within seconds (the watchdog names the dead rank, or MPICH aborts at
    once); a server restarted on the same port, 4 ranks tensor-parallel (the module's
    4-rank server), serves exact tokens, chat streamed; SIGSTOP of its rank 1 mid-stream
    ends the job after --timeout, the watchdog naming the stopped rank."""
    port = pipeline2.url.rsplit(":", 1)[1]
    seconds, status, printed, outcomes = strike(pipeline2, signal.SIGKILL)
    assert status != 0 and seconds < FAULTS_TIMEOUT + SLACK, (status, seconds, printed)
    assert "finished" not in outcomes, outcomes
    assert "Traceback" not in printed, printed
    if "dllm.serve: error" in printed:
        assert "rank 1" in printed and "died" in printed, printed
    elif FAULTS_LAUNCHER:   # MPICH aborts the job itself when the rank died mid-transfer
        assert "TERMINATED WITH THE EXIT STRING" in printed and status == 9, printed

    server = Server(4, chat_model, "--port", port, "--model-name", FAULTS_MARKER,
                    "--timeout", str(FAULTS_TIMEOUT), launcher=FAULTS_LAUNCHER)
    assert server.url.endswith(":" + port)
    client = server.client()
    text = client.completions.create(model="m", prompt=PROMPTS[1], max_tokens=16,
                                     temperature=0).choices[0].text
    assert text == ref_text(reference, PROMPTS[1], 16)
    ids = reference.tokenizer.encode("[INST] Hi [/INST]", bos=True)
    chunks = list(client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
        temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref_text(
        reference, None, 8, ids=ids)

    seconds, status, printed, outcomes = strike(server, signal.SIGSTOP)
    assert status != 0, printed
    assert FAULTS_TIMEOUT <= seconds < FAULTS_TIMEOUT + SLACK, (seconds, printed)
    assert "finished" not in outcomes, outcomes
    assert "rank 1" in printed and "stopped" in printed and "--timeout" in printed, printed


def test_bad_kv_block_size_is_one_error_line():
    result = subprocess.run([sys.executable, "-m", "dllm.serve", "--model", str(dllm.demo_model()),
                             "--kv-block-size", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "dllm.serve: error: --kv-block-size must be at least 1, got 0"]
