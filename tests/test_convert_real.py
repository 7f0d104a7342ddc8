"""Converted real models from ../shared (skipped when it is absent).

- stories260K (llama2.c .bin + tok512.bin): greedy text from BOS, 200 steps as llama2.c's
  test_all.py runs it (`run stories260K.bin -z tok512.bin -t 0 -n 200`: stop early only on
  BOS), equals an independent llama2.c-style forward and decoder written here, and starts
  with the text llama2.c's test expects.
- tinystories-1m / -6m (HF): perplexity of valid.txt through the library API by
  reference.json's documented method, within 1% in f32; the Q40 figure is reported beside it.

The stories260K test is collective (marked mpi). The perplexity runs take seconds per model
on one rank, and test_real_models.py pins these models' logits at every world size, so they
run in the serial suite only.
"""
import json
import math
import re
import struct

import numpy as np
import pytest

import dllm
from dllm.convert import convert
from dllm.sampler import Sampler

from conftest import SHARED, WORLD, all_ranks

STORIES = SHARED / "models" / "stories260K"
EXPECTED_START = ("Once upon a time, there was a little girl named Lily. She loved to play "
                  "outside in the park.")
STEPS = 200


def need(path):
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared holds the real models)")
    return path


def convert_on_root(tmp_path_factory, source, name, quant):
    path = None
    if WORLD.is_root:
        path = str(tmp_path_factory.mktemp("real") / f"{name}-{quant}.h5")
        convert(source, path, quant, log=lambda m: None)
    return WORLD.bcast(path)


# --- stories260K ---------------------------------------------------------------------------

def llama2c_greedy(path, steps):
    """Token ids of run.c's greedy loop from BOS, in float64 numpy: the checkpoint read with
    struct, RoPE from its stored freq_cis tables, query head h reading kv head
    h // (n_heads / n_kv_heads); stops before a BOS (token 1) as run.c does."""
    raw = path.read_bytes()
    dim, hidden, L, heads, kv_heads, vocab, seq = struct.unpack_from("<7i", raw)
    floats, hs = np.frombuffer(raw, "<f4", offset=28).astype(np.float64), dim // heads
    kv_dim, vocab, at = kv_heads * hs, abs(vocab), [0]

    def take(*shape):
        n = math.prod(shape)
        at[0] += n
        return floats[at[0] - n:at[0]].reshape(shape)
    emb, rms_att = take(vocab, dim), take(L, dim)
    wq, wk, wv = take(L, dim, dim), take(L, kv_dim, dim), take(L, kv_dim, dim)
    wo, rms_ffn = take(L, dim, dim), take(L, dim)
    w1, w2, w3 = take(L, hidden, dim), take(L, dim, hidden), take(L, hidden, dim)
    rms_final, fcr, fci = take(dim), take(seq, hs // 2), take(seq, hs // 2)
    wcls = emb
    k_cache, v_cache = np.zeros((L, seq, kv_dim)), np.zeros((L, seq, kv_dim))

    def rmsnorm(x, w):
        return x / np.sqrt(np.mean(x * x) + 1e-5) * w

    def rotate(v, pos):
        out = v.copy()
        for i in range(0, len(v), 2):
            c, s = fcr[pos, (i % hs) // 2], fci[pos, (i % hs) // 2]
            out[i], out[i + 1] = v[i] * c - v[i + 1] * s, v[i] * s + v[i + 1] * c
        return out

    token, out = 1, []
    for pos in range(steps):
        x = emb[token].copy()
        for l in range(L):
            xb = rmsnorm(x, rms_att[l])
            q, k_cache[l, pos], v_cache[l, pos] = (rotate(wq[l] @ xb, pos),
                                                   rotate(wk[l] @ xb, pos), wv[l] @ xb)
            att = np.empty(dim)
            for h in range(heads):
                kv = (h // (heads // kv_heads)) * hs
                scores = k_cache[l, :pos + 1, kv:kv + hs] @ q[h * hs:(h + 1) * hs] / math.sqrt(hs)
                p = np.exp(scores - scores.max())
                att[h * hs:(h + 1) * hs] = (p / p.sum()) @ v_cache[l, :pos + 1, kv:kv + hs]
            x = x + wo[l] @ att
            xb = rmsnorm(x, rms_ffn[l])
            g = w1[l] @ xb
            x = x + w2[l] @ (g / (1 + np.exp(-g)) * (w3[l] @ xb))
        token = int(np.argmax(wcls @ rmsnorm(x, rms_final)))
        if token == 1:
            break
        out.append(token)
    return out


def llama2c_decode(path, tokens):
    """run.c's decode + safe_printf: strip the space after BOS, <0xXX> pieces as raw bytes,
    unprintable single bytes dropped."""
    raw, pieces, offset = path.read_bytes(), [], 4
    while offset < len(raw):
        _, n = struct.unpack_from("<fi", raw, offset)
        pieces.append(raw[offset + 8:offset + 8 + n])
        offset += 8 + n
    text, prev = b"", 1
    for t in tokens:
        piece = pieces[t][1:] if prev == 1 and pieces[t][:1] == b" " else pieces[t]
        if re.fullmatch(rb"<0x[0-9A-F]{2}>", piece):
            piece = bytes([int(piece[3:5], 16)])
        if len(piece) == 1 and not (chr(piece[0]).isprintable() or chr(piece[0]).isspace()):
            piece = b""
        text, prev = text + piece, t
    return text.decode()


@pytest.fixture(scope="module")
def stories260k(tmp_path_factory):
    need(STORIES / "stories260K.bin")
    return convert_on_root(tmp_path_factory, STORIES / "stories260K.bin", "stories260K", "f32")


@pytest.mark.mpi
def test_stories260k_greedy_text_equals_llama2c(stories260k):
    model = dllm.load(stories260k, sync="f32")
    tokens = []
    for t in model.generate([1], STEPS, Sampler(0.0), stop_at_eos=False):
        if t == 1:              # run.c stops when the model starts a new story
            break
        tokens.append(t)
    ok = True
    if WORLD.is_root:
        text = model.tokenizer.decode(tokens)
        expected = llama2c_greedy(STORIES / "stories260K.bin", STEPS)
        ok = (tokens == expected and text.startswith(EXPECTED_START)
              and text == llama2c_decode(STORIES / "tok512.bin", expected))
        print(f"{len(tokens)} tokens: {text!r}")
    assert all_ranks(ok)


# --- tinystories perplexity -------------------------------------------------------------------

MODELS = ["tinystories-1m", "tinystories-6m"]


def valid_ids():
    import sentencepiece
    folder = need(SHARED / "models" / "tinystories-tokenizer")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    return sp.encode((folder / "valid.txt").read_text(encoding="utf-8"))


def perplexity(model, ids, window=256, bos=1):
    """reference.json's method: chunks of window-1 ids, each run as [BOS] + chunk from
    position 0; every chunk token scored, BOS not; exp(total NLL / ids). Root's value."""
    nll = 0.0
    for start in range(0, len(ids), window - 1):
        chunk = ids[start:start + window - 1]
        logits = model.logits([bos] + chunk)
        if logits is not None:
            z = logits[:-1].astype(np.float64)
            top = z.max(axis=1)
            logsumexp = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
            nll += float((logsumexp - z[np.arange(len(chunk)), chunk]).sum())
    return math.exp(nll / len(ids))


@pytest.mark.parametrize("name", MODELS)
def test_valid_perplexity_f32_within_one_percent(name, tmp_path_factory):
    folder = need(SHARED / "models" / name / "hf")
    ids = valid_ids()
    path = convert_on_root(tmp_path_factory, folder, name, "f32")
    ppl = perplexity(dllm.load(path, sync="f32", prefill_chunk=256), ids)
    ok = True
    if WORLD.is_root:
        reference = json.loads((folder.parent / "reference.json").read_text())
        expected = reference["valid_perplexity"]["perplexity"]
        print(f"{name}: f32 perplexity {ppl:.4f}, reference {expected:.4f}")
        ok = len(ids) == reference["valid_perplexity"]["tokens_scored"] and \
            abs(ppl / expected - 1) <= 0.01
    assert all_ranks(ok)


def test_valid_perplexity_q40_reported(tmp_path_factory):
    """Q40 weights with the default Q80 exchange: reported, and within 3% of f32 (both
    models: kernels/convert_perplexity.py, figures in docs/conversion.md)."""
    name = "tinystories-1m"
    folder = need(SHARED / "models" / name / "hf")
    path = convert_on_root(tmp_path_factory, folder, name, "q40")
    ppl = perplexity(dllm.load(path, sync="q80", prefill_chunk=256), valid_ids())
    expected = json.loads((folder.parent / "reference.json").read_text())
    expected = expected["valid_perplexity"]["perplexity"]
    print(f"{name}: Q40 perplexity {ppl:.4f} (f32 reference {expected:.4f})")
    assert abs(ppl / expected - 1) <= 0.03
