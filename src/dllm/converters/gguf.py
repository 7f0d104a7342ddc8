"""llama.cpp GGUF files (general.architecture = "llama"), read with the ``gguf`` package.

GGUF tensors are already in the engine's layout: [out, in] rows (numpy shape is the reverse
of GGML's ne), wq/wk in interleaved RoPE order (llama.cpp's converter permutes them). A
tensor of a type dllm's weight-type table has (Q4_0, Q8_0, F16, BF16, F32: the same GGML
bytes) is offered as stored, so that --quant keep (the default for GGUF) copies it byte for
byte; every other type gguf-py can dequantize (the K-quants, ...) is read as float32 and
requantized as the TypePolicy says (common.assign_types).

Metadata is decoded here (``field_value``) rather than with ReaderField.contents(), which
gguf-py 0.10-0.13 lack.

The tokenizer comes from tokenizer.ggml.*: a "llama" (SentencePiece) vocabulary becomes a
SentencePiece model with the same pieces, scores and types; a "gpt2" byte-level BPE
vocabulary with Llama 3's pre-tokenizer ("llama-bpe") becomes a Hugging Face tokenizer.json.
"""
import json
import os

import numpy as np

from ..config import ModelConfig
from ..errors import DllmError
from ..kernels import rope_frequencies
from ..modelfile import StoredTensor
from ..tokenizer import CONTROL, USER_DEFINED, detect_chat_template, sentencepiece_model
from .common import SOURCE_TYPES, Checkpoint, LazyTensor, expand_names

GGUF_MAGIC = b"GGUF"

# GGUF tensor names -> dllm names ({i} is the layer).
GGUF_NAMES = {
    "token_embd.weight": "tok_embeddings",
    "output_norm.weight": "norm",
    "output.weight": "output",
    "blk.{i}.attn_norm.weight": "layers/{i}/attention_norm",
    "blk.{i}.attn_q.weight": "layers/{i}/wq",
    "blk.{i}.attn_k.weight": "layers/{i}/wk",
    "blk.{i}.attn_v.weight": "layers/{i}/wv",
    "blk.{i}.attn_output.weight": "layers/{i}/wo",
    "blk.{i}.ffn_norm.weight": "layers/{i}/ffn_norm",
    "blk.{i}.ffn_gate.weight": "layers/{i}/w1",
    "blk.{i}.ffn_down.weight": "layers/{i}/w2",
    "blk.{i}.ffn_up.weight": "layers/{i}/w3",
}

# Llama 3's pre-tokenizer split (its tokenizer.json; llama.cpp's "llama-bpe").
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?"
                r"[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def is_gguf(path):
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def read_gguf(path):
    """Open a GGUF file as a Checkpoint; tensors of the table's types are StoredTensors."""
    import gguf
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError, TypeError) as exc:
        raise DllmError(f"{path} cannot be read as GGUF (truncated or corrupt? {exc})") from None
    except AttributeError as exc:   # a gguf-py older than numpy (0.10-0.12 with numpy 2)
        raise DllmError(f"gguf {_version(gguf)} cannot read GGUF files with numpy "
                        f"{np.__version__} ({exc}): pip install 'gguf>=0.13'") from None
    meta = GGUFMeta(reader)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise DllmError(f"{path}: GGUF architecture {arch!r} is not llama")
    tensors = {t.name: t for t in reader.tensors}
    size = os.path.getsize(path)
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise DllmError(f"{path} is truncated: tensor {t.name} ends past the end of the file")
    config, warnings = gguf_config(meta, tensors, path)
    tokenizer, tok_warning = gguf_tokenizer(meta)
    if tok_warning:
        warnings.append(tok_warning)
    jinja = meta.get("tokenizer.chat_template")
    names = gguf_names(config)
    source_types = {ours: gguf.GGMLQuantizationType(tensors[g].tensor_type).name
                    for g, ours in names.items() if g in tensors}
    return Checkpoint(config, lambda: gguf_tensors(tensors, config), tokenizer,
                      detect_chat_template(jinja), jinja,
                      metadata={"source": f"gguf:{os.path.basename(path)}",
                                "source_format": "gguf"},
                      warnings=warnings, config_origin="the GGUF metadata",
                      source_names={ours: g for g, ours in names.items()},
                      source_types=source_types)


def _version(module):
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(module.__name__)
    except PackageNotFoundError:
        return "(unknown version)"


class GGUFMeta:
    """Key/value metadata of a GGUF reader as plain Python values."""

    def __init__(self, reader):
        self.fields = reader.fields

    def get(self, key, default=None):
        field = self.fields.get(key)
        return default if field is None else field_value(field)

    def float(self, key, default):
        """A float32 field as the shortest decimal that rounds to it (1e-05, not
        9.999999747378752e-06), as the source config wrote it."""
        value = self.get(key)
        return default if value is None else float(str(np.float32(value)))

    def require(self, key):
        value = self.get(key)
        if value is None:
            raise DllmError(f"GGUF metadata lacks {key}")
        return value


def gguf_config(meta, tensors, path):
    """(ModelConfig, warnings) of llama.* metadata."""
    dim = meta.require("llama.embedding_length")
    n_heads = meta.require("llama.attention.head_count")
    if "token_embd.weight" not in tensors:
        raise DllmError(f"{path} has no token_embd.weight tensor")
    vocab = int(tensors["token_embd.weight"].shape[1])   # ne = (dim, vocab)
    rot = meta.get("llama.rope.dimension_count", dim // n_heads)
    if rot != dim // n_heads:
        raise DllmError(f"{path}: RoPE over {rot} of {dim // n_heads} head dimensions is "
                        f"not supported")
    n_kv = meta.get("llama.attention.head_count_kv", n_heads)
    if isinstance(n_heads, list) or isinstance(n_kv, list):
        raise DllmError(f"{path}: per-layer head counts are not supported")
    theta = meta.float("llama.rope.freq_base", 10000.0)
    warnings = []
    config = ModelConfig(
        dim=dim, hidden_dim=meta.require("llama.feed_forward_length"),
        n_layers=meta.require("llama.block_count"), n_heads=n_heads, n_kv_heads=n_kv,
        vocab_size=vocab, max_seq_len=meta.get("llama.context_length", 2048),
        norm_eps=meta.float("llama.attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=theta, tie_embeddings="output.weight" not in tensors,
        bos_id=meta.get("tokenizer.ggml.bos_token_id", 1),
        eos_id=meta.get("tokenizer.ggml.eos_token_id", 2),
        **gguf_rope_scaling(meta, tensors, dim // n_heads, theta, path))
    return config.check(), warnings


def gguf_rope_scaling(meta, tensors, head_dim, theta, path):
    """RoPE scaling fields: llama.rope.scaling.type "linear", or Llama 3.1's per-frequency
    divisors that llama.cpp stores as the tensor rope_freqs.weight, matched against Meta's
    formula (low/high frequency factors 1 and 4 unless the metadata says otherwise)."""
    kind = meta.get("llama.rope.scaling.type", "none")
    factor = meta.float("llama.rope.scaling.factor", 1.0)
    if "rope_freqs.weight" in tensors:
        divisors = np.asarray(tensors["rope_freqs.weight"].data, np.float64).reshape(-1)
        factor = float(divisors.max())
        fields = {"rope_scaling": "llama3", "rope_factor": factor,
                  "rope_original_max_seq_len": int(meta.get(
                      "llama.rope.scaling.original_context_length", 8192)),
                  "rope_low_freq_factor": 1.0, "rope_high_freq_factor": 4.0}
        base = rope_frequencies(head_dim, theta)
        scaled = rope_frequencies(head_dim, theta, "llama3", factor, 1.0, 4.0,
                                  fields["rope_original_max_seq_len"])
        if divisors.shape != base.shape or not np.allclose(base / scaled, divisors, rtol=1e-4):
            raise DllmError(f"{path}: rope_freqs.weight does not follow Llama 3.1's RoPE "
                            f"scaling; this scaling is not supported")
        return fields
    if kind in ("none", None) or factor == 1.0:
        return {}
    if kind == "linear":
        return {"rope_scaling": "linear", "rope_factor": factor}
    raise DllmError(f"{path}: RoPE scaling {kind!r} is not supported (dllm has linear and "
                    f"llama3)")


def gguf_names(config):
    """{GGUF name: dllm name} of every tensor the config implies."""
    return expand_names(GGUF_NAMES, config, "output.weight")


def field_value(field):
    """A GGUF metadata field as a Python value: a number, a bool, a str, or a list of
    them (arrays), from the ReaderField's parts as every gguf-py version >= 0.10 lays them
    out (parts[data[i]] holds item i; a string item is its UTF-8 bytes)."""
    import gguf
    if not field.types:
        return None
    STRING, ARRAY = gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY

    def item(index, kind):
        part = field.parts[index]
        if kind == STRING:
            return bytes(part).decode("utf-8", errors="replace")
        value = part.tolist()
        return value[0] if len(value) == 1 else value
    if field.types[0] == ARRAY:
        return [item(i, field.types[-1]) for i in field.data]
    return item(field.data[0], field.types[0])


def gguf_tensors(tensors, config):
    """Yield (dllm name, tensor) of a llama GGUF, one at a time."""
    names = gguf_names(config)
    missing = [n for n in names if n not in tensors]
    if missing:
        raise DllmError(f"GGUF file lacks {missing[0]} ({len(missing)} tensors missing)")
    extra = sorted(set(tensors) - set(names) - {"rope_freqs.weight", "output.weight"})
    if extra:
        raise DllmError(f"GGUF tensor {extra[0]} is not part of a Llama model "
                        f"({len(extra)} such tensors)")
    for g, ours in names.items():
        yield ours, gguf_tensor(tensors[g])


def gguf_tensor(t):
    """A StoredTensor of a matrix whose type the table has (its GGML bytes as they are;
    BF16 viewed as uint16 bits), else a LazyTensor of float32 rows (norms; K-quants and
    other types, dequantized by gguf-py)."""
    import gguf
    kind = gguf.GGMLQuantizationType(t.tensor_type)
    data = t.data
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))
    if len(shape) == 2 and shape[0] == 1 and data.ndim == 1:
        shape = shape[1:]
    if kind.name in SOURCE_TYPES and len(shape) == 2:
        if kind == gguf.GGMLQuantizationType.BF16:
            data = data.view(np.uint16)
        return StoredTensor(data, SOURCE_TYPES[kind.name], kind.name)
    if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return LazyTensor(shape, lambda a, b: data[a:b], kind.name)

    def read(a, b):
        try:
            return gguf.quants.dequantize(np.asarray(data[a:b]), kind)
        except NotImplementedError:
            raise DllmError(f"GGUF tensor {t.name} has type {kind.name}, which gguf-py "
                            f"cannot dequantize") from None
    return LazyTensor(shape, read, kind.name)


def gguf_tokenizer(meta):
    """((kind, bytes) or None, warning or None) of tokenizer.ggml.* metadata."""
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if model is None or not tokens:
        return None, None
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if model == "llama":
        scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        charsmap = meta.get("tokenizer.ggml.precompiled_charsmap")
        blob = sentencepiece_model(
            list(zip(tokens, scores, types)),
            add_dummy_prefix=meta.get("tokenizer.ggml.add_space_prefix", True),
            remove_extra_whitespaces=meta.get("tokenizer.ggml.remove_extra_whitespaces", False),
            precompiled_charsmap=bytes(charsmap or b""),
            bos_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_id=meta.get("tokenizer.ggml.eos_token_id"))
        return ("sentencepiece", blob), None
    pre = meta.get("tokenizer.ggml.pre", "default")
    if model == "gpt2" and pre in ("llama-bpe", "llama3", "default", "gpt2"):
        merges = meta.get("tokenizer.ggml.merges") or []
        bos = meta.get("tokenizer.ggml.bos_token_id")
        add_bos = meta.get("tokenizer.ggml.add_bos_token", True)
        doc = byte_level_tokenizer_json(tokens, types, merges, pre,
                                        tokens[bos] if add_bos and bos is not None else None)
        return ("tokenizers", json.dumps(doc, ensure_ascii=False).encode()), None
    return None, (f"GGUF tokenizer {model!r} (pre-tokenizer {pre!r}) is not supported; "
                  f"convert with --tokenizer PATH")


def byte_level_tokenizer_json(tokens, types, merges, pre, bos_token):
    """A Hugging Face tokenizer.json for a GGUF byte-level BPE vocabulary: Llama 3's split
    regex then GPT-2's byte-to-unicode mapping ("llama-bpe", which also emits a word found
    whole in the vocabulary before merging), or GPT-2's own split ("default")."""
    llama3 = pre in ("llama-bpe", "llama3")
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": not llama3}
    pre_tokenizer = byte_level if not llama3 else {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated",
         "invert": False}, byte_level]}
    added = [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": kind == CONTROL}
             for i, (tok, kind) in enumerate(zip(tokens, types)) if kind in (CONTROL, USER_DEFINED)]
    post = None
    if bos_token is not None:
        bos_id = tokens.index(bos_token)
        post = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos_token, "type_id": 0}},
                           {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos_token, "type_id": 0}},
                         {"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos_token: {"id": bos_token, "ids": [bos_id],
                                               "tokens": [bos_token]}}}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": None, "pre_tokenizer": pre_tokenizer, "post_processor": post,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                        "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None,
                      "continuing_subword_prefix": None, "end_of_word_suffix": None,
                      "fuse_unk": False, "byte_fallback": False, "ignore_merges": llama3,
                      "vocab": {tok: i for i, tok in enumerate(tokens)},
                      "merges": list(merges)}}
