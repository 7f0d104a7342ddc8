"""A llama.cpp-layout Q4_0 GGUF (Q4_0 layers, Q8_0 classifier, F32 embedding) converted with
the types kept (the default) and, as dllm did before format v2, re-quantized to all Q4_0;
each file's logits against a float64 forward of the GGUF's own dequantized weights.

    python kernels/gguf_keep.py [--layers 4] [--dim 512] [--tokens 64]

Random weights of a Llama shape (unit-rms rows), written by gguf-py; the forward is
tests/reference.py's (independent of dllm's kernels); one rank, numpy kernels, f32 sync.
"""
import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import dllm  # noqa: E402
from dllm.comm import Comm  # noqa: E402
from dllm.config import ModelConfig  # noqa: E402
from dllm.convert import convert  # noqa: E402

from conftest import random_weights  # noqa: E402
from reference import reference_logits, relative_error  # noqa: E402
from test_convert import gguf_values, write_gguf  # noqa: E402

LLAMA_CPP_Q4_0 = {"output": "Q8_0", "tok_embeddings": "F32"}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--tokens", type=int, default=64)
    args = p.parse_args()
    cfg = ModelConfig(dim=args.dim, hidden_dim=args.dim * 8 // 3 // 32 * 32,
                      n_layers=args.layers, n_heads=args.dim // 64, n_kv_heads=args.dim // 64,
                      vocab_size=4096, max_seq_len=args.tokens)
    weights = random_weights(cfg, 0)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, args.tokens).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        kind = lambda name: LLAMA_CPP_Q4_0.get(name, "Q4_0")   # noqa: E731
        stored = write_gguf(Path(tmp) / "m.gguf", weights, cfg, qtype=kind)
        values = {n: gguf_values(d, kind(n) if d.ndim == 2 else "F32") for n, d in stored.items()}
        expected = reference_logits(values, cfg, tokens)
        print(f"{args.layers} layers, dim {args.dim}, vocab {cfg.vocab_size}, {args.tokens} "
              f"tokens; GGUF: Q4_0 layers, Q8_0 classifier, F32 embedding")
        print(f"{'conversion':34s} {'rel. max error':>14s} {'top-1 differs':>13s}")
        for label, options in (("--quant keep (default)", {}),
                               ("all q40 (dllm before v2)", dict(quant="q40", output_quant="q40",
                                                                 embedding_quant="q40"))):
            out = Path(tmp) / "m.h5"
            convert(Path(tmp) / "m.gguf", out, log=lambda m: None, **options)
            model = dllm.load(out, comm=Comm.self_comm(), sync="f32", kernels="numpy",
                              prefill_chunk=args.tokens)
            logits = model.logits(tokens)
            flips = int((logits.argmax(1) != expected.argmax(1)).sum())
            print(f"{label:34s} {relative_error(logits, expected):14.2e} {flips:13d}")


if __name__ == "__main__":
    main()
