"""Peak RSS of converting a Llama-2-7B-shaped Hugging Face checkpoint (issue 3: < 2 GB).

    python kernels/convert_rss.py [--layers 2] [--quant q40] [--keep DIR]

Builds, in a temporary folder, a checkpoint with Llama 2 7B's shapes (dim 4096, hidden 11008,
32 heads, vocab 32000, untied classifier) but only --layers layers: random BF16 weights in
two safetensors shards with an index file, as Meta's release on the Hub is laid out, plus
the Llama 2 tokenizer from ../shared when present. Memory is bounded per tensor, so a few
layers show the peak of the whole model: the largest tensors (embedding and classifier,
32000 x 4096) are in every variant. Then runs

    /usr/bin/time -v python -m dllm.convert DIR -o OUT.h5 --quant Q --quiet

and prints the conditions, the wall time and the "Maximum resident set size".
"""
import argparse
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"dim": 4096, "hidden": 11008, "heads": 32, "vocab": 32000}


def tensor_shapes(layers):
    d, h, v = SHAPES["dim"], SHAPES["hidden"], SHAPES["vocab"]
    shapes = {"model.embed_tokens.weight": (v, d), "lm_head.weight": (v, d),
              "model.norm.weight": (d,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (d,),
                       p + "post_attention_layernorm.weight": (d,),
                       p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (d, d),
                       p + "self_attn.v_proj.weight": (d, d), p + "self_attn.o_proj.weight": (d, d),
                       p + "mlp.gate_proj.weight": (h, d), p + "mlp.up_proj.weight": (h, d),
                       p + "mlp.down_proj.weight": (d, h)})
    return shapes


def write_bf16_safetensors(path, shapes, rng):
    """Stream random BF16 tensors (normal, std 0.02 like trained Llama weights; norms 1)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name, shape in shapes.items():
            if len(shape) == 1:
                values = np.ones(shape, np.float32)
                f.write((values.view(np.uint32) >> 16).astype("<u2").tobytes())
                continue
            step = max(1, (1 << 22) // shape[1])
            for r in range(0, shape[0], step):
                rows = (0.02 * rng.standard_normal((min(step, shape[0] - r), shape[1]))
                        ).astype(np.float32)
                f.write((rows.view(np.uint32) >> 16).astype("<u2").tobytes())


def build_checkpoint(folder, layers, seed=0):
    rng = np.random.default_rng(seed)
    shapes = tensor_shapes(layers)
    names = list(shapes)
    half = len(names) // 2
    weight_map = {}
    for k, part in enumerate((names[:half], names[half:])):
        file = f"model-{k + 1:05d}-of-00002.safetensors"
        write_bf16_safetensors(folder / file, {n: shapes[n] for n in part}, rng)
        weight_map.update({n: file for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": SHAPES["dim"], "intermediate_size": SHAPES["hidden"],
        "num_hidden_layers": layers, "num_attention_heads": SHAPES["heads"],
        "num_key_value_heads": SHAPES["heads"], "vocab_size": SHAPES["vocab"],
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "bfloat16"}))
    tokenizer = ROOT.parent / "shared" / "models" / "llama2-tokenizer" / "tokenizer.model"
    if tokenizer.is_file():
        shutil.copy(tokenizer, folder / "tokenizer.model")
    return sum(p.stat().st_size for p in folder.iterdir())


def measure(folder, out, quant):
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "dllm.convert", str(folder), "-o",
           str(out), "--quant", quant, "--quiet"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"conversion failed:\n{result.stderr}")
    stats = dict(line.strip().rsplit(": ", 1) for line in result.stderr.splitlines()
                 if ": " in line and line.startswith("\t"))
    return (int(stats["Maximum resident set size (kbytes)"]) * 1024,
            stats["Elapsed (wall clock) time (h:mm:ss or m:ss)"], " ".join(cmd[2:]))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2, help="layers of the checkpoint (default 2)")
    p.add_argument("--quant", default="q40", choices=("q40", "f32"))
    p.add_argument("--keep", default=None, help="build the checkpoint here and keep it")
    args = p.parse_args()
    tmp = Path(args.keep or tempfile.mkdtemp(prefix="dllm-rss-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        folder = tmp / "llama2-7b-shaped"
        folder.mkdir(exist_ok=True)
        size = build_checkpoint(folder, args.layers)
        rss, wall, cmd = measure(folder, tmp / "out.h5", args.quant)
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True).stdout.strip()
        print(f"git {rev}, {platform.node()}, {os.cpu_count()} cpus, python "
              f"{platform.python_version()}")
        print(f"checkpoint: Llama-2-7B shapes, {args.layers} layers, BF16, "
              f"{size / 2**30:.2f} GiB in 2 safetensors shards")
        print(f"command: /usr/bin/time -v {cmd}")
        print(f"output: {(tmp / 'out.h5').stat().st_size / 2**30:.2f} GiB ({args.quant})")
        print(f"wall time {wall}, peak RSS {rss / 2**20:.0f} MiB")
    finally:
        if args.keep is None:
            shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
