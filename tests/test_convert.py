"""dllm.convert: one tiny random model written as a Hugging Face folder, a GGUF file and a
llama2.c .bin by this file's own writers (independent of the converters), converted back.

The three conversions must give the same logits, equal to tests/reference.py's float64
forward over the original weights; GGUF Q4_0 bytes must arrive unchanged; bad input gives
one error line and leaves no file. Collective tests are marked mpi.
"""
import json
import math
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

import dllm
from dllm.comm import Comm
from dllm.config import ModelConfig
from dllm.convert import convert, hf_to_interleaved, main
from dllm.converters.common import LazyTensor, permute_rows, zero_padded
from dllm.converters.hf import interleaved_order
from dllm.converters.llama2c import theta_from_freq_cis
from dllm.errors import DllmError
from dllm.kernels import rope_frequencies, rope_tables
from dllm.modelfile import ModelFile, tensor_shapes
from dllm.quant import dequantize_q40
from dllm.weight_types import TYPES

from conftest import SHARED, WORLD, all_ranks, random_weights
from reference import _rope, reference_logits, relative_error

TINY = ModelConfig(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96,
                   max_seq_len=32)
TOKENS = [1, 5, 9, 2, 33, 17, 40, 3, 11, 25, 7, 90]

# --- writers of the three source formats (the test's own, sharing nothing with dllm) --------

HF_LAYER = {"attention_norm": "input_layernorm", "wq": "self_attn.q_proj",
            "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
            "ffn_norm": "post_attention_layernorm", "w1": "mlp.gate_proj",
            "w2": "mlp.down_proj", "w3": "mlp.up_proj"}
GGUF_LAYER = {"attention_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v",
              "wo": "attn_output", "ffn_norm": "ffn_norm", "w1": "ffn_gate", "w2": "ffn_down",
              "w3": "ffn_up"}


def to_rotate_half(w, n_heads):
    """Interleaved rows (pairs 2i, 2i+1) -> HF's layout (per head: even rows, then odd)."""
    rows, cols = w.shape
    hd = rows // n_heads
    return np.concatenate([np.concatenate([w[h * hd:(h + 1) * hd:2], w[h * hd + 1:(h + 1) * hd:2]])
                           for h in range(n_heads)]).reshape(rows, cols)


def hf_name(name):
    top = {"tok_embeddings": "model.embed_tokens.weight", "norm": "model.norm.weight",
           "output": "lm_head.weight"}
    if name in top:
        return top[name]
    _, layer, kind = name.split("/")
    return f"model.layers.{layer}.{HF_LAYER[kind]}.weight"


def write_safetensors(path, tensors, dtype="F32"):
    """A .safetensors file written by hand (F32, F16 or BF16 by truncating float32 bits)."""
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        a = np.ascontiguousarray(array, np.float32)
        if dtype == "BF16":
            data = (a.view(np.uint32) >> 16).astype("<u2").tobytes()
        else:
            data = a.astype("<f4" if dtype == "F32" else "<f2").tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def write_hf(folder, weights, cfg, dtype="F32", shards=1, extra_config=None):
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "llama", "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim,
              "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
              "num_key_value_heads": cfg.n_kv_heads, "vocab_size": cfg.vocab_size,
              "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
              "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_embeddings,
              "bos_token_id": 1, "eos_token_id": 2, **(extra_config or {})}
    (folder / "config.json").write_text(json.dumps(config))
    tensors = {}
    for name, w in weights.items():
        if name.endswith("/wq"):
            w = to_rotate_half(w, cfg.n_heads)
        elif name.endswith("/wk"):
            w = to_rotate_half(w, cfg.n_kv_heads)
        tensors[hf_name(name)] = w
    names = sorted(tensors)
    if shards == 1:
        write_safetensors(folder / "model.safetensors", tensors, dtype)
        return folder
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        write_safetensors(folder / file, part, dtype)
        weight_map.update({n: file for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def gguf_name(name):
    top = {"tok_embeddings": "token_embd.weight", "norm": "output_norm.weight",
           "output": "output.weight"}
    if name in top:
        return top[name]
    _, layer, kind = name.split("/")
    return f"blk.{layer}.{GGUF_LAYER[kind]}.weight"


def write_gguf(path, weights, cfg, qtype=lambda name: "F32", vocab=None):
    """A llama GGUF via gguf-py's writer; qtype(dllm name) picks each tensor's type."""
    import gguf
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    if vocab is not None:
        vocab(w)
    stored = {}
    for name, array in weights.items():
        kind = qtype(name) if array.ndim == 2 else "F32"
        if kind == "F32":
            data = np.asarray(array, np.float32)
            w.add_tensor(gguf_name(name), data)
        elif kind == "F16":
            data = np.asarray(array, np.float16)
            w.add_tensor(gguf_name(name), data)
        else:
            t = gguf.GGMLQuantizationType[kind]
            data = gguf.quants.quantize(np.asarray(array, np.float32), t)
            w.add_tensor(gguf_name(name), data, raw_dtype=t)
        stored[name] = data
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def write_llama2c(path, weights, cfg, theta=10000.0):
    """llama2.c legacy (v0) export: header, float32 tensors, freq_cis tables, wcls if untied."""
    L, hs = cfg.n_layers, cfg.head_dim
    vocab = cfg.vocab_size if cfg.tie_embeddings else -cfg.vocab_size
    parts = [struct.pack("<7i", cfg.dim, cfg.hidden_dim, L, cfg.n_heads, cfg.n_kv_heads, vocab,
                         cfg.max_seq_len), weights["tok_embeddings"]]
    for kind in ("attention_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3"):
        parts += [weights[f"layers/{i}/{kind}"] for i in range(L)]
    freqs = 1.0 / theta ** (np.arange(0, hs, 2)[:hs // 2] / hs)
    angles = np.outer(np.arange(cfg.max_seq_len), freqs).astype(np.float32)
    parts += [weights["norm"], np.cos(angles), np.sin(angles)]
    if not cfg.tie_embeddings:
        parts.append(weights["output"])
    path.write_bytes(b"".join(p if isinstance(p, bytes) else np.asarray(p, "<f4").tobytes()
                              for p in parts))
    return path


def quiet(message):
    pass


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The tiny model in each source format, converted to f32 (root writes; paths shared)."""
    paths = None
    if WORLD.is_root:
        base = tmp_path_factory.mktemp("convert")
        weights = random_weights(TINY, 7)
        write_hf(base / "hf", weights, TINY)
        write_gguf(base / "tiny.gguf", weights, TINY)
        write_llama2c(base / "tiny.bin", weights, TINY)
        paths = {}
        for fmt, src in (("hf", base / "hf"), ("gguf", base / "tiny.gguf"),
                         ("llama2c", base / "tiny.bin")):
            paths[fmt] = base / f"{fmt}.h5"
            convert(src, paths[fmt], "f32", log=quiet)
        paths = {k: str(v) for k, v in paths.items()}
    return {k: v for k, v in WORLD.bcast(paths).items()}


# --- the same model from three formats -----------------------------------------------------

@pytest.mark.mpi
def test_hf_gguf_llama2c_give_the_same_logits_as_the_reference(sources):
    logits = {fmt: dllm.load(path, sync="f32", prefill_chunk=5).logits(TOKENS)
              for fmt, path in sources.items()}
    ok = True
    if WORLD.is_root:
        expected = reference_logits(random_weights(TINY, 7), TINY, TOKENS)
        errors = {fmt: relative_error(v, expected) for fmt, v in logits.items()}
        errors.update({f"{fmt} vs hf": relative_error(v, logits["hf"])
                       for fmt, v in logits.items()})
        ok = max(errors.values()) <= 1e-5
        print(errors)
    assert all_ranks(ok)


def test_converted_files_hold_the_same_weights(sources):
    weights = random_weights(TINY, 7)
    for path in sources.values():
        with ModelFile(path) as mf:
            assert mf.config == TINY
            for name, w in weights.items():
                assert np.array_equal(mf.read(name), w), (path, name)
    with ModelFile(sources["hf"]) as mf:     # the folder's path, not just its name ("hf")
        folder = Path(sources["hf"]).parent / "hf"
        assert mf.metadata()["source"] == f"hf:{folder.resolve()}"


def test_llama2c_recovers_theta_and_hf_reads_bf16_shards(tmp_path):
    cfg = ModelConfig(**{**TINY.to_dict(), "rope_theta": 500000.0, "tie_embeddings": True})
    weights = random_weights(cfg, 3)
    convert(write_llama2c(tmp_path / "m.bin", weights, cfg, theta=500000.0),
            tmp_path / "a.h5", "f32", log=quiet)
    convert(write_hf(tmp_path / "hf", weights, cfg, dtype="BF16", shards=3), tmp_path / "b.h5",
            "f32", log=quiet)
    with ModelFile(tmp_path / "a.h5") as a, ModelFile(tmp_path / "b.h5") as b:
        assert a.config == b.config == cfg
        for name, w in weights.items():
            bf16 = (w.view(np.uint32) & 0xFFFF0000).view(np.float32)
            assert np.array_equal(a.read(name), w) and np.array_equal(b.read(name), bf16)


def test_hf_reader_without_the_safetensors_package(tmp_path, monkeypatch):
    weights = random_weights(TINY, 4)
    folder = write_hf(tmp_path / "hf", weights, TINY, dtype="F16")
    convert(folder, tmp_path / "with.h5", "f32", log=quiet)
    monkeypatch.setattr("dllm.converters.hf._safe_open", lambda path: None)
    convert(folder, tmp_path / "without.h5", "f32", log=quiet)
    with ModelFile(tmp_path / "with.h5") as a, ModelFile(tmp_path / "without.h5") as b:
        for name, w in weights.items():
            assert np.array_equal(a.read(name), w.astype(np.float16).astype(np.float32))
            assert np.array_equal(a.read(name), b.read(name))


# --- the Q/K permutation -----------------------------------------------------------------

def test_hf_to_interleaved_inverts_the_hf_layout_per_head_count():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6 * 8, 5)).astype(np.float32)
    for n in (6, 3, 1):          # as wq (all heads) and as wk (kv heads of the same size)
        assert np.array_equal(hf_to_interleaved(to_rotate_half(w, n), n), w)
    lazy = permute_rows(LazyTensor.of(to_rotate_half(w, 6)), interleaved_order(6, 8))
    assert np.array_equal(np.concatenate([lazy[0:7], lazy[7:30], lazy[30:48]]), w)


def test_rotate_half_rope_on_hf_rows_equals_interleaved_rope_on_permuted_rows():
    rng = np.random.default_rng(1)
    heads, hd, dim = 3, 8, 12
    wq_hf = rng.standard_normal((heads * hd, dim))
    x = rng.standard_normal((5, dim))
    positions = np.arange(5)
    hf = _rope((x @ wq_hf.T).reshape(5, heads, hd), positions, 10000.0, "half")
    ours = _rope((x @ hf_to_interleaved(wq_hf, heads).T).reshape(5, heads, hd), positions,
                 10000.0, "interleaved")
    # the same rotation; the head's values come out in interleaved order
    assert np.allclose(hf_to_interleaved(hf.reshape(-1, 1), heads * 5).reshape(hf.shape), ours)


# --- GGUF types ----------------------------------------------------------------------------

def test_gguf_q4_0_bytes_round_trip_unchanged(tmp_path):
    weights = random_weights(TINY, 5)
    stored = write_gguf(tmp_path / "q.gguf", weights, TINY,
                        qtype=lambda n: "Q8_0" if n.endswith("/wv") else "Q4_0")
    _, reports = convert(tmp_path / "q.gguf", tmp_path / "q.h5", "q40", log=quiet)
    copied = {r.name for r in reports if r.max_err is None}
    with h5py.File(tmp_path / "q.h5", "r") as f:
        for name, data in stored.items():
            if data.dtype == np.uint8 and not name.endswith("/wv"):
                assert name in copied
                assert f[name].dtype == np.uint8 and f[name][()].tobytes() == data.tobytes()
    assert {r.name for r in reports if r.name.endswith("/wv")}.isdisjoint(copied)


def test_gguf_f16_q8_0_q4_0_dequantized_for_f32(tmp_path):
    import gguf
    weights = random_weights(TINY, 6)
    kinds = {"wq": "F16", "wk": "Q8_0", "wv": "Q4_0"}
    stored = write_gguf(tmp_path / "m.gguf", weights, TINY,
                        qtype=lambda n: kinds.get(n.rsplit("/", 1)[-1], "F32"))
    convert(tmp_path / "m.gguf", tmp_path / "m.h5", "f32", log=quiet)
    with ModelFile(tmp_path / "m.h5") as mf:
        for name, data in stored.items():
            kind = kinds.get(name.rsplit("/", 1)[-1], "F32") if data.ndim == 2 else "F32"
            if kind in ("Q8_0", "Q4_0"):
                expected = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind])
            else:
                expected = data.astype(np.float32)
            assert np.array_equal(mf.read(name), expected), name


# --- shapes the engine needs padded, RoPE scaling --------------------------------------------

@pytest.mark.mpi
def test_unblocked_hidden_and_dim_are_padded_or_kept_f32(tmp_path_factory):
    """hidden 40 -> w1/w3/w2 zero-padded to 64 (exact); dim 48 matrices stay f32 in a q40
    file. Logits equal the reference of the unpadded weights."""
    cfg = ModelConfig(dim=48, hidden_dim=40, n_layers=2, n_heads=4, n_kv_heads=2,
                      vocab_size=64, max_seq_len=32)
    weights = random_weights(cfg, 8)
    path = None
    if WORLD.is_root:
        base = tmp_path_factory.mktemp("pad")
        path = str(base / "pad.h5")
        convert(write_llama2c(base / "pad.bin", weights, cfg), path, "q40", log=quiet)
    path = WORLD.bcast(path)
    logits = dllm.load(path, sync="f32", kernels="numpy").logits(TOKENS[:8])  # f32 inputs
    ok = True
    if WORLD.is_root:
        with ModelFile(path) as mf:
            ok = (mf.config.hidden_dim == 64 and mf.h5.attrs["hidden_dim_unpadded"] == 40
                  and mf.tensor_quant("layers/0/w2") == "q40"
                  and mf.tensor_quant("layers/0/w1") == "f32"
                  and not mf.read("layers/1/w1")[40:].any())
            for i in range(cfg.n_layers):   # the reference uses the stored (Q4_0) w2
                weights[f"layers/{i}/w2"] = dequantize_q40(mf.read(f"layers/{i}/w2"))[:, :40]
        ok = ok and relative_error(logits, reference_logits(weights, cfg, TOKENS[:8])) <= 1e-5
    assert all_ranks(ok)


def test_llama3_rope_scaling_matches_metas_formula_and_hf_config(tmp_path):
    theta, hd, factor, low, high, old = 500000.0, 128, 8.0, 1.0, 4.0, 8192
    expected = []
    for f in 1.0 / theta ** (np.arange(0, hd, 2) / hd):     # Meta's apply_scaling, as a loop
        wavelen = 2 * np.pi / f
        if wavelen < old / high:
            expected.append(f)
        elif wavelen > old / low:
            expected.append(f / factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            expected.append((1 - smooth) * f / factor + smooth * f)
    ours = rope_frequencies(hd, theta, "llama3", factor, low, high, old)
    assert np.allclose(ours, expected, rtol=1e-12)
    cos, sin = rope_tables(hd, 4, theta, "llama3", factor, low, high, old)
    assert np.allclose(cos[3], np.cos(3 * np.array(expected)), atol=1e-6)
    scaling = {"rope_scaling": {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                                "high_freq_factor": high,
                                "original_max_position_embeddings": old}}
    write_hf(tmp_path / "hf", random_weights(TINY, 1), TINY, extra_config=scaling)
    config, _ = convert(tmp_path / "hf", tmp_path / "m.h5", "f32", log=quiet)
    with ModelFile(tmp_path / "m.h5") as mf:
        assert mf.config == config
        assert (config.rope_scaling, config.rope_factor, config.rope_original_max_seq_len) == \
            ("llama3", 8.0, 8192)


def test_theta_recovery_and_lazy_padding():
    hs = 8
    for theta in (10000.0, 500000.0, 1e6):
        freqs = theta ** (-np.arange(0, hs, 2) / hs)
        angles = np.outer(np.arange(64), freqs).astype(np.float32)
        assert theta_from_freq_cis(np.cos(angles), np.sin(angles), hs) == (theta, None)
    padded = zero_padded(LazyTensor.of(np.ones((3, 2), np.float32)), (5, 4))
    assert np.array_equal(padded[0:5].sum(axis=0), [3, 3, 0, 0])


# --- command line: progress, table, errors --------------------------------------------------

def test_cli_prints_progress_and_error_table(tmp_path, capsys):
    write_llama2c(tmp_path / "m.bin", random_weights(TINY, 2), TINY)
    assert main([str(tmp_path / "m.bin"), "-o", str(tmp_path / "m.h5")]) == 0
    err = capsys.readouterr().err
    assert "100%" in err and "max err" in err and "rms err" in err
    assert "layers/1/w3" in err and "warning: no tokenizer" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin", "m.h5"]


def bad_sources(tmp_path):
    weights = random_weights(TINY, 2)
    hf = write_hf(tmp_path / "hf", weights, TINY)
    blob = (hf / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(blob[:len(blob) // 2])
    write_gguf(tmp_path / "t.gguf", weights, TINY)
    blob = (tmp_path / "t.gguf").read_bytes()
    (tmp_path / "t.gguf").write_bytes(blob[:len(blob) - 1000])
    write_llama2c(tmp_path / "t.bin", weights, TINY)
    blob = (tmp_path / "t.bin").read_bytes()
    (tmp_path / "t.bin").write_bytes(blob[:-4])
    (tmp_path / "junk.dat").write_bytes(b"\x00" * 10)
    (tmp_path / "empty").mkdir()
    return {"missing folder": (tmp_path / "nope", "does not exist"),
            "folder without config.json": (tmp_path / "empty", "config.json"),
            "unknown format": (tmp_path / "junk.dat", "unknown checkpoint format"),
            "truncated safetensors": (hf, "truncated"),
            "truncated gguf": (tmp_path / "t.gguf", "t.gguf"),
            "truncated llama2.c": (tmp_path / "t.bin", "truncated")}


def test_bad_input_gives_one_error_line_and_no_file(tmp_path, capsys):
    for case, (source, fragment) in bad_sources(tmp_path).items():
        out = tmp_path / "out.h5"
        assert main([str(source), "-o", str(out), "--quiet"]) == 1, case
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("dllm.convert: error: "), (case, err)
        assert fragment in err[0], (case, err)
        assert not [p for p in tmp_path.iterdir() if p.suffix == ".h5" or ".tmp-" in p.name]
    assert main([str(tmp_path / "hf"), "-o", str(tmp_path / "no" / "dir.h5")]) == 1
    assert main(["synthetic", "-o", str(tmp_path / "s.h5")]) == 1
    assert "--preset" in capsys.readouterr().err


def one_error_line(capsys, argv, fragment):
    """main(argv) fails with one error line (after any warnings) containing fragment."""
    assert main(argv + ["--quiet"]) == 1, argv
    err = [line for line in capsys.readouterr().err.strip().splitlines()
           if not line.startswith("dllm.convert: warning: ")]
    assert len(err) == 1 and err[0].startswith("dllm.convert: error: "), (argv, err)
    assert fragment in err[0], (argv, err)


def test_format_flag_on_a_missing_file_or_a_folder(tmp_path, capsys):
    (tmp_path / "dir").mkdir()
    (tmp_path / "short.bin").write_bytes(b"abc")
    out = ["-o", str(tmp_path / "out.h5")]
    for fmt in ("llama2c", "gguf"):
        one_error_line(capsys, [str(tmp_path / "nope"), "--format", fmt] + out,
                       "does not exist")
        one_error_line(capsys, [str(tmp_path / "dir"), "--format", fmt] + out,
                       "dir is a folder, not a")
    one_error_line(capsys, [str(tmp_path / "short.bin"), "--format", "llama2c"] + out,
                   "too short to be a llama2.c checkpoint")
    one_error_line(capsys, [str(tmp_path / "nope"), "--format", "hf"] + out, "does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "short.bin"]


def test_config_that_disagrees_with_the_tensors_is_one_error_line(tmp_path, capsys):
    """An edited config.json or GGUF metadata: one line naming the tensor and both shapes,
    before padding could hide it (intermediate_size 100 would pad to 128)."""
    weights = random_weights(TINY, 2)
    gate = "model.layers.0.mlp.gate_proj.weight"
    cases = {
        "intermediate_size": (128, f"{gate} has shape (96, 64), but config.json implies "
                                   f"(128, 64)"),
        "num_key_value_heads": (4, "model.layers.0.self_attn.k_proj.weight has shape "
                                   "(32, 64), but config.json implies (64, 64)"),
        "vocab_size": (100, "model.embed_tokens.weight has shape (96, 64), but config.json "
                            "implies (100, 64)"),
        "num_hidden_layers": (1, "tensors of layer 1 (model.layers.1.*), but config.json "
                                 "says num_hidden_layers = 1")}
    cases["intermediate_size 100"] = (100, f"{gate} has shape (96, 64), but config.json "
                                           f"implies (100, 64)")
    for key, (value, fragment) in cases.items():
        folder = write_hf(tmp_path / "hf", weights, TINY,
                          extra_config={key.split()[0]: value})
        one_error_line(capsys, [str(folder), "-o", str(tmp_path / "m.h5")], fragment)
    edited = ModelConfig(**{**TINY.to_dict(), "hidden_dim": 128})
    for qtype in ("F32", "Q4_0"):     # a float tensor, and Q4_0 bytes copied as stored
        write_gguf(tmp_path / "m.gguf", weights, edited, qtype=lambda n: qtype)
        one_error_line(capsys, [str(tmp_path / "m.gguf"), "-o", str(tmp_path / "m.h5")],
                       "blk.0.ffn_gate.weight has shape (96, 64), but the GGUF metadata "
                       "implies (128, 64)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "m.gguf"]


def test_command_line_error_has_no_traceback(tmp_path):
    (tmp_path / "junk.bin").write_bytes(b"not a model")
    result = subprocess.run([sys.executable, "-m", "dllm.convert", str(tmp_path / "junk.bin"),
                             "-o", str(tmp_path / "x.h5")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("dllm.convert: error: ")
    assert list(tmp_path.iterdir()) == [tmp_path / "junk.bin"]


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    write_llama2c(tmp_path / "m.bin", random_weights(TINY, 2), TINY)
    from dllm.converters import llama2c

    def failing(arrays, config):
        yield "tok_embeddings", LazyTensor.of(arrays["tok_embeddings"])
        raise KeyboardInterrupt
    monkeypatch.setattr(llama2c, "llama2c_tensors", failing)
    assert main([str(tmp_path / "m.bin"), "-o", str(tmp_path / "m.h5"), "--quiet"]) == 130
    assert list(tmp_path.iterdir()) == [tmp_path / "m.bin"]
    with pytest.raises(DllmError, match="--quant"):
        convert(tmp_path / "m.bin", tmp_path / "m.h5", "q8")


@pytest.mark.parametrize("when", ["before the rename", "after the rename"])
def test_interrupt_message_says_what_is_on_disk(when, tmp_path, monkeypatch, capsys):
    """The rename is atomic: an interrupt leaves the old output or the new one, and says
    which (the issue: "nothing written" though the new file had replaced the old)."""
    import dllm.atomic
    write_llama2c(tmp_path / "m.bin", random_weights(TINY, 2), TINY)
    out = tmp_path / "m.h5"
    out.write_text("the old output")

    def interrupt(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(dllm.atomic, "_fsync" if when == "before the rename" else
                        "_fsync_folder", interrupt)
    assert main([str(tmp_path / "m.bin"), "-o", str(out), "--quiet"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin", "m.h5"]
    if when == "before the rename":
        assert out.read_text() == "the old output"
        assert err[-1] == f"dllm.convert: interrupted; {out} unchanged"
    else:
        assert h5py.is_hdf5(out)
        assert err[-1] == f"dllm.convert: interrupted; {out} was written completely before " \
                          f"the interrupt"


def test_sigterm_mid_conversion_removes_the_temporary_file(tmp_path):
    """A 7B-shaped synthetic model (2 layers, 0.37 GB) is still being written when the
    temporary file appears; SIGTERM must remove it, print one line and exit 143."""
    out = tmp_path / "big.h5"
    proc = subprocess.Popen([sys.executable, "-m", "dllm.convert", "synthetic", "--preset",
                             "llama2-7b", "--layers", "2", "-o", str(out), "--quiet"],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".big.h5.tmp-*")) and proc.poll() is None:
        assert time.monotonic() < deadline, "no temporary file appeared"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if "warning:" not in line]
    assert proc.returncode == 143, err
    assert lines == ["dllm.convert: interrupted; nothing written"], err
    assert list(tmp_path.iterdir()) == []


def test_stale_temporary_files_of_dead_processes_are_removed(tmp_path, capsys):
    write_llama2c(tmp_path / "m.bin", random_weights(TINY, 2), TINY)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".m.h5.tmp-{dead.pid}"
    kept = [tmp_path / f".m.h5.tmp-{os.getppid()}", tmp_path / ".m.h5.tmp-x1",
            tmp_path / f".other.h5.tmp-{dead.pid}"]
    for p in [stale] + kept:
        p.write_bytes(b"partial")
    assert main([str(tmp_path / "m.bin"), "-o", str(tmp_path / "m.h5"), "--quiet"]) == 0
    assert f"removed {stale}" in capsys.readouterr().err
    assert sorted(tmp_path.iterdir()) == sorted(kept + [tmp_path / "m.bin", tmp_path / "m.h5"])


# --- synthetic models, inspect -----------------------------------------------------------

def test_synthetic_presets_have_the_published_shapes():
    from dllm.converters.synthetic import PRESETS, random_q40
    params = {name: sum(math.prod(s) for s in tensor_shapes(c).values())
              for name, c in PRESETS.items()}
    assert round(params["llama2-7b"] / 1e9, 2) == 6.74
    assert round(params["llama2-13b"] / 1e9, 2) == 13.02
    assert round(params["llama2-70b"] / 1e9, 1) == 69.0
    assert round(params["llama3-8b"] / 1e9, 2) == 8.03
    assert round(params["tinyllama-1.1b"] / 1e9, 2) == 1.10
    values = dequantize_q40(random_q40(np.random.default_rng(0), (64, 4096), 0.5))
    assert abs(np.sqrt(np.mean(values ** 2)) / 0.5 - 1) < 0.05 and abs(values.mean()) < 0.01


@pytest.mark.mpi
def test_synthetic_reduced_preset_runs_with_finite_logits(tmp_path_factory):
    path = None
    if WORLD.is_root:
        path = str(tmp_path_factory.mktemp("synthetic") / "tiny.h5")
        assert main(["synthetic", "--preset", "tinyllama-1.1b", "--layers", "2", "-o", path,
                     "--quiet"]) == 0
    model = dllm.load(WORLD.bcast(path))
    logits = model.logits([1, 500, 31999])
    ok = True
    if WORLD.is_root:
        residual = np.sqrt(np.mean(model.state.residual ** 2))
        ok = (model.config.n_layers == 2 and model.config.dim == 2048 and
              np.isfinite(logits).all() and 0.3 < logits.std() < 3 and residual < 10)
    assert all_ranks(ok)


def numbered_sentencepiece(n):
    """A SentencePiece model of n pieces (unk, <s>, </s>, 256 bytes, then "▁w<i>")."""
    from dllm.tokenizer import BYTE, CONTROL, NORMAL, UNKNOWN, sentencepiece_model
    pieces = [("<unk>", 0.0, UNKNOWN), ("<s>", 0.0, CONTROL), ("</s>", 0.0, CONTROL)]
    pieces += [(f"<0x{b:02X}>", 0.0, BYTE) for b in range(256)]
    return sentencepiece_model(pieces + [(f"\u2581w{i}", -float(i), NORMAL)
                                         for i in range(n - len(pieces))])


def test_synthetic_embeds_a_tokenizer_of_the_presets_vocabulary(tmp_path, capsys):
    (tmp_path / "32000.model").write_bytes(numbered_sentencepiece(32000))
    (tmp_path / "320.model").write_bytes(numbered_sentencepiece(320))
    tokenizers = [tmp_path / "32000.model"]
    llama2 = SHARED / "models" / "llama2-tokenizer" / "tokenizer.model"
    tokenizers += [llama2] if llama2.is_file() else []
    out = tmp_path / "syn.h5"
    preset = ["synthetic", "--preset", "tinyllama-1.1b", "--layers", "1", "-o", str(out)]
    for tokenizer in tokenizers:
        assert main(preset + ["--tokenizer", str(tokenizer), "--chat-template", "llama2",
                              "--quiet"]) == 0
        assert "no tokenizer" not in capsys.readouterr().err
        with ModelFile(out) as mf:
            assert mf.tokenizer() == ("sentencepiece", tokenizer.read_bytes())
            assert mf.chat_template() == "llama2"
    out.unlink()
    for args, fragment in (
            (["--tokenizer", str(tmp_path / "320.model")],
             "320.model has 320 tokens but the model's vocabulary is 32000"),
            (["--format", "hf"], "--format applies to checkpoint files, not to 'synthetic'"),
            (["--chat-template", "llama2"], "--chat-template llama2 needs a tokenizer"),
            (["--tokenizer", str(tmp_path / "32000.model"), "--chat-template", "llama3"],
             "--chat-template llama3 needs the token <|begin_of_text|>, which this "
             "tokenizer lacks")):
        one_error_line(capsys, preset + args, fragment)
    one_error_line(capsys, [str(tmp_path / "32000.model"), "-o", str(out), "--seed", "1"],
                   "--seed apply to 'synthetic' only")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["320.model", "32000.model"]


def test_inspect_shows_config_tokenizer_tensors_and_memory_per_rank(sources, capsys):
    from dllm.inspect import main as inspect_main
    assert inspect_main([sources["llama2c"], "--ranks", "2"]) == 0
    out = capsys.readouterr().out
    for fragment in ("dim 64, hidden 96, layers 2, heads 4 (kv 2, head_dim 16)",
                     "tokenizer   none", "layers/*/wq", "x2", "2 ranks", "kv cache",
                     "source_format = llama2c-v0"):
        assert fragment in out, fragment
    assert inspect_main([sources["llama2c"], "--ranks", "5"]) == 1
    assert "cannot split 4 query heads over 5 ranks" in capsys.readouterr().err
    assert inspect_main([sources["llama2c"] + ".missing"]) == 1


# --- GGUF files of every type, kept as stored (format v2) ------------------------------------

GGUF_LAYOUTS = {
    # llama.cpp's Q4_0: the layers Q4_0, the classifier Q8_0, the embedding F32
    "llama.cpp-q4_0": lambda n: {"output": "Q8_0", "tok_embeddings": "F32"}.get(n, "Q4_0"),
    "q8_0": lambda n: "Q8_0",
    "f16": lambda n: "F16",
    "bf16": lambda n: "BF16",
}
KEPT = {"Q4_0": "q40", "Q8_0": "q80", "F16": "f16", "BF16": "bf16", "F32": "f32"}


def gguf_values(data, kind):
    """The float values of a GGUF tensor, by gguf-py (independent of dllm's decoders)."""
    import gguf
    if kind in ("F32", "F16"):
        return np.asarray(data, np.float32)
    return gguf.quants.dequantize(np.asarray(data), gguf.GGMLQuantizationType[kind])


@pytest.fixture(scope="module")
def typed_ggufs(tmp_path_factory):
    """Each layout of GGUF_LAYOUTS converted with the default (keep); root writes."""
    out = None
    if WORLD.is_root:
        base = tmp_path_factory.mktemp("typed")
        weights = random_weights(TINY, 11)
        out = {}
        for layout, qtype in GGUF_LAYOUTS.items():
            stored = write_gguf(base / f"{layout}.gguf", weights, TINY, qtype=qtype)
            _, reports = convert(base / f"{layout}.gguf", base / f"{layout}.h5", log=quiet)
            values = {n: gguf_values(d, qtype(n) if d.ndim == 2 else "F32")
                      for n, d in stored.items()}
            out[layout] = (str(base / f"{layout}.h5"), stored, values,
                           {r.name: (r.quant, r.max_err) for r in reports})
    return WORLD.bcast(out)


@pytest.mark.mpi
@pytest.mark.parametrize("layout", GGUF_LAYOUTS)
def test_gguf_types_are_kept_and_run_like_their_own_weights(typed_ggufs, layout):
    """Every tensor stored in its GGUF type byte for byte; the logits at this world size
    (f32 sync, numpy kernels) equal a float64 forward of the GGUF's own dequantized values."""
    path, stored, values, reports = typed_ggufs[layout]
    qtype = GGUF_LAYOUTS[layout]
    logits = dllm.load(path, sync="f32", kernels="numpy").logits(TOKENS)
    ok = True
    if WORLD.is_root:
        with h5py.File(path, "r") as f:
            for name, data in stored.items():
                if data.ndim == 2:
                    ok &= reports[name] == (KEPT[qtype(name)], None)        # copied
                    ok &= f[name][()].tobytes() == np.asarray(data).tobytes()
        error = relative_error(logits, reference_logits(values, TINY, TOKENS))
        print(layout, error)
        ok &= error <= 1e-4
    assert all_ranks(ok)


@pytest.mark.mpi
def test_gguf_types_run_on_the_fast_kernels_and_in_pipeline_mode(typed_ggufs):
    """The llama.cpp layout (Q4_0, Q8_0, F32) on the default kernels, tensor and pipeline,
    Q80 sync: close to the float forward (Q80 rounding of the activations and, on the fast
    kernels, of the decode inputs)."""
    path, _, values, _ = typed_ggufs["llama.cpp-q4_0"]
    runs = [dllm.load(path).logits(TOKENS)]
    if WORLD.size <= TINY.n_layers:
        runs.append(dllm.load(path, parallel="pipeline").logits(TOKENS))
    ok = True
    if WORLD.is_root:
        expected = reference_logits(values, TINY, TOKENS)
        ok = all(relative_error(r, expected) <= 0.05 for r in runs)
    assert all_ranks(ok)


def random_q4_k(rng, rows, cols):
    """GGML Q4_K bytes (rows, cols/256*144) that gguf-py decodes, whose codes and 6-bit
    scales are random: d and dmin (the first two f16 of each 144-byte block) are small."""
    import gguf
    blocks = rows * cols // 256
    raw = rng.integers(0, 256, (blocks, 144), dtype=np.uint8)
    raw[:, 0:2] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
    raw[:, 2:4] = np.frombuffer(np.float16(0.001).tobytes(), np.uint8)
    data = raw.reshape(rows, cols // 256 * 144)
    values = gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q4_K)
    return data, values


def test_gguf_k_quants_are_requantized_with_a_warning_and_their_error(tmp_path):
    import gguf
    cfg = ModelConfig(dim=256, hidden_dim=256, n_layers=1, n_heads=4, n_kv_heads=4,
                      vocab_size=32, max_seq_len=16)
    rng = np.random.default_rng(3)
    weights = random_weights(cfg, 12)
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    for add, value in ((w.add_context_length, 16), (w.add_embedding_length, 256),
                       (w.add_block_count, 1), (w.add_feed_forward_length, 256),
                       (w.add_head_count, 4), (w.add_head_count_kv, 4),
                       (w.add_layer_norm_rms_eps, cfg.norm_eps),
                       (w.add_rope_freq_base, cfg.rope_theta)):
        add(value)
    values = {}
    for name, array in weights.items():
        if array.ndim == 2 and name.startswith("layers/"):
            data, values[name] = random_q4_k(rng, *array.shape)
            w.add_tensor(gguf_name(name), data, raw_dtype=gguf.GGMLQuantizationType.Q4_K)
        else:
            values[name] = np.asarray(array, np.float32)
            w.add_tensor(gguf_name(name), values[name])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    said = []
    _, reports = convert(tmp_path / "k.gguf", tmp_path / "k.h5", log=said.append)
    warnings = [m for m in said if "Q4_K" in m]
    assert len(warnings) == 1 and "requantized to q80" in warnings[0], said
    by_name = {r.name: r for r in reports}
    with ModelFile(tmp_path / "k.h5") as mf:
        for name, v in values.items():
            if name.startswith("layers/") and v.ndim == 2:
                r = by_name[name]
                assert (r.source, r.quant, mf.tensor_quant(name)) == ("Q4_K", "q80", "q80")
                got = TYPES["q80"].dequantize(mf.read(name))
                assert np.isclose(r.max_err, np.abs(got - v).max(), rtol=1e-5)
                assert 0 < r.rms_err < 0.01 * r.rms
    _, reports = convert(tmp_path / "k.gguf", tmp_path / "k4.h5", other_quant="q40",
                         log=quiet)
    assert {r.quant for r in reports if r.source == "Q4_K"} == {"q40"}


def test_format_v1_files_still_load(tmp_path):
    """A v1 file (q40 and f32 only, format_version 1) loads as it did."""
    weights = random_weights(TINY, 13)
    convert(write_llama2c(tmp_path / "m.bin", weights, TINY), tmp_path / "m.h5", "q40",
            output_quant="q40", log=quiet)
    with h5py.File(tmp_path / "m.h5", "r+") as f:
        f.attrs["format_version"] = 1
        f.attrs["quant"] = "q40"
    model = dllm.load(str(tmp_path / "m.h5"), comm=Comm.self_comm(), sync="f32",
                      kernels="numpy")
    assert model.quant == "q40" and model.logits(TOKENS).shape == (len(TOKENS), TINY.vocab_size)
    with h5py.File(tmp_path / "m.h5", "r+") as f:
        f["layers/0/wq"].attrs["quant"] = "q80"      # v1 had no q80
    with pytest.raises(DllmError, match="bad quant"):
        dllm.load(str(tmp_path / "m.h5"), comm=Comm.self_comm())


def test_an_interrupt_swallowed_by_a_finalizer_prints_nothing_and_writes_nothing(
        tmp_path, monkeypatch):
    """SIGTERM's handler may raise inside a weakref callback or a __del__, where Python only
    hands the exception to sys.unraisablehook (by default: "Exception ignored" and a
    traceback) and goes on: the recorded interrupt stops the rename and is raised there,
    the hook never sees it, and the hook that was there before is back afterwards."""
    import gc
    from dllm.atomic import interrupted, replacing
    from dllm.convert import Terminated
    seen = []
    record = seen.append
    monkeypatch.setattr(sys, "unraisablehook", record)

    class Finalized:
        def __del__(self):
            exc = Terminated()
            interrupted(exc)            # what convert's SIGTERM handler does, then raises
            raise exc

    out = tmp_path / "out.txt"
    with pytest.raises(Terminated):
        try:
            with replacing(out) as tmp:
                tmp.write_text("half")
                Finalized()                 # dropped at once: its __del__ raises, swallowed
                gc.collect()
        finally:
            interrupted(None)
    assert not out.exists() and not list(tmp_path.iterdir())
    assert seen == [] and sys.unraisablehook is record
