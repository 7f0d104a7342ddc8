"""python -m dllm.convert SRC -o OUT.h5 [--quant q40|f32]: checkpoints to the dllm model file.

Sources: a Hugging Face Llama folder (config.json + *.safetensors, F32/F16/BF16). Tensors are
read one at a time through a memory map and written straight out, so memory stays bounded by
the largest tensor. The output is written to a temporary file and renamed when complete.
"""
import json
import struct
import sys
from pathlib import Path

import numpy as np

from .cli import ArgumentParser
from .config import ModelConfig
from .errors import DllmError
from .modelfile import write_model

PROG = "dllm.convert"

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


def hf_to_interleaved(w, n_heads):
    """Reorder wq/wk rows from HF's rotate-half RoPE layout (each head: first halves, then
    second halves) to interleaved pairs (2i, 2i+1), the GGML / llama2.c convention.
    w: (n_heads * head_dim, in). For wk pass the kv head count."""
    rows, cols = w.shape
    head_dim = rows // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def read_safetensors_index(path):
    """{tensor name: (file, dtype, shape, byte offset)} of one .safetensors file."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    base = 8 + header_len
    index = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise DllmError(f"{path.name}: tensor {name} has unsupported dtype {info['dtype']}")
        index[name] = (path, info["dtype"], tuple(info["shape"]), base + info["data_offsets"][0])
    return index


def load_tensor(entry):
    """float32 copy of one safetensors tensor (BF16 widened by a 16-bit shift)."""
    path, dtype, shape, offset = entry
    raw = np.memmap(path, dtype=SAFETENSORS_DTYPES[dtype], mode="r", offset=offset,
                    shape=shape)
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return np.array(raw, dtype=np.float32)


def hf_config(folder):
    with open(folder / "config.json") as f:
        cfg = json.load(f)
    if cfg.get("model_type") not in ("llama", "mistral"):
        raise DllmError(f"{folder}: model_type {cfg.get('model_type')!r} is not a Llama model")
    theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return ModelConfig(
        dim=cfg["hidden_size"], hidden_dim=cfg["intermediate_size"],
        n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
        n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        vocab_size=cfg["vocab_size"], max_seq_len=cfg.get("max_position_embeddings", 2048),
        norm_eps=cfg.get("rms_norm_eps", 1e-5), rope_theta=theta,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_id=cfg.get("bos_token_id") or 1, eos_id=_first(cfg.get("eos_token_id"), 2)).check()


def _first(value, default):
    if isinstance(value, list):
        return value[0] if value else default
    return default if value is None else value


def hf_tensors(folder, config):
    """Yield (dllm name, float32 array) of an HF Llama folder, one tensor at a time."""
    index = {}
    for path in sorted(folder.glob("*.safetensors")):
        index.update(read_safetensors_index(path))
    if not index:
        raise DllmError(f"{folder}: no .safetensors files")
    names = {}
    for hf, ours in HF_NAMES.items():
        for i in range(config.n_layers) if "{i}" in hf else [None]:
            names[hf.format(i=i)] = ours.format(i=i)
    if config.tie_embeddings:
        names.pop("lm_head.weight")
    missing = [n for n in names if n not in index]
    if missing:
        raise DllmError(f"{folder}: checkpoint lacks {missing[0]} ({len(missing)} missing)")
    for hf, ours in names.items():
        w = load_tensor(index[hf])
        if ours.endswith("/wq"):
            w = hf_to_interleaved(w, config.n_heads)
        elif ours.endswith("/wk"):
            w = hf_to_interleaved(w, config.n_kv_heads)
        yield ours, w


def convert_hf(folder, out, quant="q40", log=print):
    folder = Path(folder)
    config = hf_config(folder)
    tokenizer_path = folder / "tokenizer.model"
    tokenizer = ("sentencepiece", tokenizer_path.read_bytes()) if tokenizer_path.is_file() else None
    if tokenizer is None:
        log(f"{PROG}: warning: {folder} has no tokenizer.model; the model will serve logits "
            f"and token ids, and text generation needs --tokenizer")
    write_model(out, config, hf_tensors(folder, config), quant=quant, tokenizer=tokenizer,
                metadata={"source": f"hf:{folder.name}", "converter": "dllm.convert"})
    return config


def main(argv=None):
    p = ArgumentParser(prog=f"python -m {PROG}", description=__doc__.splitlines()[0])
    p.add_argument("source", help="Hugging Face Llama folder")
    p.add_argument("-o", "--output", required=True, help="output .h5 model file")
    p.add_argument("--quant", default="q40", choices=("q40", "f32"),
                   help="weight type of the matrices (default q40)")
    try:
        args = p.parse_args(argv)
        source = Path(args.source)
        if not (source / "config.json").is_file():
            raise DllmError(f"{source} is not a Hugging Face model folder (no config.json)")
        config = convert_hf(source, args.output, args.quant,
                            log=lambda m: print(m, file=sys.stderr))
    except DllmError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    print(f"{PROG}: wrote {args.output} ({config.n_layers} layers, dim {config.dim}, "
          f"{args.quant})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
