"""Hugging Face Llama folders: config.json, one or many *.safetensors (index file), and the
tokenizer (tokenizer.model, else tokenizer.json) with its chat template.

Llama 1/2/3/3.1/3.2, TinyLlama, Mistral (model_type "llama" or "mistral"): grouped-query
attention, tied embeddings, Llama 3.1 RoPE scaling. HF stores wq/wk rows for rotate-half RoPE;
hf_to_interleaved reorders them to the interleaved pairs the engine rotates.

Tensors are read with the ``safetensors`` package (an optional extra) where it can: its numpy
reader has no bfloat16, so BF16 tensors, and every tensor when the package is missing, are
read through a memory map of the raw bytes instead (the format is an 8-byte header length, a
JSON header of dtype/shape/data_offsets, then the bytes; bfloat16 is the top half of a
float32, so widening is a 16-bit shift).
"""
import json
import struct
from pathlib import Path

import numpy as np

from ..checks import read_json
from ..config import ModelConfig
from ..errors import DllmError
from ..tokenizer import Tokenizer, detect_chat_template
from ..weight_types import dequantize_bf16
from .common import Checkpoint, LazyTensor, expand_names, permute_rows

# Hugging Face Llama tensor names -> dllm names ({i} is the layer).
HF_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings",
    "model.norm.weight": "norm",
    "lm_head.weight": "output",
    "model.layers.{i}.input_layernorm.weight": "layers/{i}/attention_norm",
    "model.layers.{i}.self_attn.q_proj.weight": "layers/{i}/wq",
    "model.layers.{i}.self_attn.k_proj.weight": "layers/{i}/wk",
    "model.layers.{i}.self_attn.v_proj.weight": "layers/{i}/wv",
    "model.layers.{i}.self_attn.o_proj.weight": "layers/{i}/wo",
    "model.layers.{i}.post_attention_layernorm.weight": "layers/{i}/ffn_norm",
    "model.layers.{i}.mlp.gate_proj.weight": "layers/{i}/w1",
    "model.layers.{i}.mlp.down_proj.weight": "layers/{i}/w2",
    "model.layers.{i}.mlp.up_proj.weight": "layers/{i}/w3",
}

SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def interleaved_order(n_heads, head_dim):
    """Row order taking HF's rotate-half rows to interleaved pairs: within each head, the
    interleaved row 2i + j is HF row j * head_dim/2 + i (j = 0, 1)."""
    half = head_dim // 2
    i, j = np.meshgrid(np.arange(half), np.arange(2), indexing="ij")   # (half, 2)
    within = (j * half + i).reshape(-1)
    return (np.arange(n_heads)[:, None] * head_dim + within[None, :]).reshape(-1)


def hf_to_interleaved(w, n_heads):
    """Reorder wq/wk rows from HF's rotate-half RoPE layout (each head: first halves, then
    second halves) to interleaved pairs (2i, 2i+1), the GGML / llama2.c convention.
    w: (n_heads * head_dim, in). For wk pass the kv head count."""
    return np.asarray(w)[interleaved_order(n_heads, w.shape[0] // n_heads)]


def is_hf_folder(path):
    return path.is_dir() and (path / "config.json").is_file()


def read_hf(folder):
    """Open a Hugging Face Llama folder as a Checkpoint."""
    folder = Path(folder)
    config, notes = hf_config(folder)
    files = SafetensorsFolder(folder)
    tokenizer, template, jinja = hf_tokenizer(folder)
    return Checkpoint(config, lambda: hf_tensors(files, config), tokenizer, template, jinja,
                      metadata={"source": f"hf:{folder.resolve()}", "source_format": "hf"},
                      warnings=notes, config_origin="config.json",
                      source_names={ours: hf for hf, ours in hf_names(config).items()})


def hf_config(folder):
    """(ModelConfig, warnings) of config.json."""
    cfg = read_json(folder / "config.json", "config.json")
    if not isinstance(cfg, dict):
        raise DllmError(f"{folder}/config.json is not a JSON object")
    try:
        if cfg.get("model_type") not in ("llama", "mistral"):
            raise DllmError(f"{folder}: model_type {cfg.get('model_type')!r} is not a Llama "
                            f"model (dllm converts llama and mistral)")
        dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or dim // n_heads
        if head_dim * n_heads != dim:
            raise DllmError(f"{folder}: head_dim {head_dim} x {n_heads} heads is not the "
                            f"hidden size {dim}; dllm needs head_dim = dim / n_heads")
        rope = cfg.get("rope_parameters") or {}
        theta = cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0
        notes = []
        max_seq = cfg.get("max_position_embeddings", 2048)
        window = cfg.get("sliding_window")
        if window and window < max_seq:
            notes.append(f"sliding_window {window}: the context is limited to {window} "
                         f"tokens (dllm attends to the whole context)")
            max_seq = window
        config = ModelConfig(
            dim=dim, hidden_dim=cfg["intermediate_size"], n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads, n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            vocab_size=cfg["vocab_size"], max_seq_len=max_seq,
            norm_eps=cfg.get("rms_norm_eps", 1e-5), rope_theta=theta,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_id=_first(cfg.get("bos_token_id"), 1), eos_id=_first(cfg.get("eos_token_id"), 2),
            **rope_scaling(cfg.get("rope_scaling") or rope, folder))
    except (TypeError, ValueError, AttributeError) as exc:   # values of the wrong type
        raise DllmError(f"{folder}/config.json holds a value dllm cannot use: {exc}") from None
    except KeyError as exc:
        raise DllmError(f"{folder}/config.json lacks {exc}") from None
    return config.check(), notes


def rope_scaling(spec, folder):
    """ModelConfig RoPE scaling fields of an HF rope_scaling (or rope_parameters) entry."""
    kind = spec.get("rope_type") or spec.get("type") or "default"
    if kind == "default":
        return {}
    if kind == "linear":
        return {"rope_scaling": "linear", "rope_factor": float(spec["factor"])}
    if kind == "llama3":
        return {"rope_scaling": "llama3", "rope_factor": float(spec["factor"]),
                "rope_low_freq_factor": float(spec["low_freq_factor"]),
                "rope_high_freq_factor": float(spec["high_freq_factor"]),
                "rope_original_max_seq_len": int(spec["original_max_position_embeddings"])}
    raise DllmError(f"{folder}: RoPE scaling {kind!r} is not supported (dllm has linear and "
                    f"llama3)")


def _first(value, default):
    if isinstance(value, list):
        return value[0] if value else default
    return default if value is None else value


class SafetensorsFile:
    """One .safetensors file: tensors by name, read lazily in row blocks as float32."""

    def __init__(self, path):
        self.path = path
        size = path.stat().st_size
        try:
            with open(path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                if header_len > size - 8:
                    raise ValueError("header runs past the end of the file")
                header = json.loads(f.read(header_len))
        except (struct.error, ValueError, UnicodeDecodeError) as exc:
            raise DllmError(f"{path} is not a safetensors file ({exc})") from None
        self.base = 8 + header_len
        self.entries = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            if self.base + end > size:
                raise DllmError(f"{path} is truncated: tensor {name} ends at byte "
                                f"{self.base + end}, the file has {size}")
            self.entries[name] = (info["dtype"], tuple(info["shape"]), begin)
        self.st = _safe_open(path)

    def tensor(self, name):
        dtype, shape, begin = self.entries[name]
        if dtype not in SAFETENSORS_DTYPES:
            raise DllmError(f"{self.path.name}: tensor {name} has dtype {dtype}; dllm reads "
                            f"{', '.join(SAFETENSORS_DTYPES)}")
        if self.st is not None and dtype != "BF16":
            rows = self.st.get_slice(name)
            return LazyTensor(shape, lambda a, b: rows[a:b], dtype)
        raw = np.memmap(self.path, dtype=SAFETENSORS_DTYPES[dtype], mode="r",
                        offset=self.base + begin, shape=shape)
        if dtype == "BF16":
            return LazyTensor(shape, lambda a, b: dequantize_bf16(raw[a:b]), dtype)
        return LazyTensor(shape, lambda a, b: raw[a:b], dtype)


def _safe_open(path):
    try:
        from safetensors import safe_open
    except ImportError:     # the optional extra is missing: the memory-map reader does all
        return None
    try:
        return safe_open(str(path), framework="numpy")
    except Exception as exc:  # SafetensorError derives from Exception only
        raise DllmError(f"{path} cannot be read: {exc}") from None


class SafetensorsFolder:
    """All weight files of a folder; model.safetensors.index.json, when present, names them."""

    def __init__(self, folder):
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = dict(read_json(index, "safetensors index")["weight_map"])
            except (KeyError, TypeError, ValueError) as exc:
                raise DllmError(f"{index} has no weight_map of file names ({exc})") from None
            paths = sorted({folder / f for f in weight_map.values()})
            missing = [p.name for p in paths if not p.is_file()]
            if missing:
                raise DllmError(f"{folder}: weight file {missing[0]} named in {index.name} "
                                f"is missing")
        else:
            paths = sorted(folder.glob("*.safetensors"))
        if not paths:
            other = sorted(p.name for p in folder.glob("*.bin")) + \
                sorted(p.name for p in folder.glob("*.pth"))
            hint = f" (found {other[0]}: PyTorch pickles are not read; save the model as " \
                   f"safetensors)" if other else ""
            raise DllmError(f"{folder}: no .safetensors weight files{hint}")
        self.files = [SafetensorsFile(p) for p in paths]
        self.where = {name: f for f in self.files for name in f.entries}

    def tensor(self, name):
        return self.where[name].tensor(name)


def hf_names(config):
    """{HF name: dllm name} of every tensor the config implies."""
    return expand_names(HF_NAMES, config, "lm_head.weight")


def hf_tensors(files, config):
    """Yield (dllm name, LazyTensor) of an HF Llama folder, one tensor at a time."""
    names = hf_names(config)
    missing = [n for n in names if n not in files.where]
    if missing:
        raise DllmError(f"checkpoint lacks {missing[0]} ({len(missing)} tensors missing)")
    beyond = f"model.layers.{config.n_layers}."
    if any(n.startswith(beyond) for n in files.where):
        raise DllmError(f"checkpoint has tensors of layer {config.n_layers} ({beyond}*), but "
                        f"config.json says num_hidden_layers = {config.n_layers}")
    for hf, ours in names.items():
        tensor = files.tensor(hf)
        if ours.endswith("/wq"):
            tensor = permute_rows(tensor, interleaved_order(config.n_heads, config.head_dim))
        elif ours.endswith("/wk"):
            tensor = permute_rows(tensor, interleaved_order(config.n_kv_heads, config.head_dim))
        yield ours, tensor


def hf_tokenizer(folder):
    """(tokenizer (kind, bytes) or None, chat template name, Jinja text) of an HF folder."""
    tokenizer = None
    if (folder / "tokenizer.model").is_file():
        tokenizer = ("sentencepiece", (folder / "tokenizer.model").read_bytes())
        if (folder / "tokenizer.json").is_file() and not _loads(tokenizer):
            tokenizer = None    # not SentencePiece (Llama 3 ships tiktoken files too)
    if tokenizer is None and (folder / "tokenizer.json").is_file():
        tokenizer = ("tokenizers", (folder / "tokenizer.json").read_bytes())
    jinja = _chat_template_text(folder)
    return tokenizer, detect_chat_template(jinja), jinja


def _loads(tokenizer):
    try:
        Tokenizer(*tokenizer)
    except DllmError:
        return False
    return True


def _chat_template_text(folder):
    """The Jinja chat template: chat_template.jinja, else tokenizer_config.json's entry (a
    string, or a list of named templates whose "default" is used)."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return None
    try:
        template = json.loads(path.read_text()).get("chat_template")
    except ValueError:
        return None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None
