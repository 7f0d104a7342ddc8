"""Perplexity of the converted tinystories models on valid.txt for every --quant and
classifier / embedding policy, through the library API with reference.json's documented
method (docs/conversion.md records the output).

    python kernels/convert_perplexity.py [--models tinystories-1m tinystories-6m]

Method (reference.json "valid_perplexity"): ids = sentencepiece.encode(valid.txt) without
BOS/EOS; consecutive chunks of 255 ids, each run as [BOS] + chunk from position 0; every
chunk token scored (BOS not); perplexity = exp(total NLL / number of ids). One rank.
"""
import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np

import dllm
from dllm.convert import convert

SHARED = Path(__file__).resolve().parents[2] / "shared" / "models"


def perplexity(model, ids, window=256, bos=1):
    nll = 0.0
    for start in range(0, len(ids), window - 1):
        chunk = ids[start:start + window - 1]
        z = model.logits([bos] + chunk)[:-1].astype(np.float64)
        top = z.max(axis=1)
        nll += float((top + np.log(np.exp(z - top[:, None]).sum(axis=1))
                      - z[np.arange(len(chunk)), chunk]).sum())
    return math.exp(nll / len(ids))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--models", nargs="+", default=["tinystories-1m", "tinystories-6m"])
    p.add_argument("--windows", type=int, default=None,
                   help="score only the first N windows (default: all, reference.json's)")
    args = p.parse_args()
    import sentencepiece
    tok = SHARED / "tinystories-tokenizer"
    missing = [str(path) for path in [tok / "valid.txt"] + [SHARED / m / "hf" for m in args.models]
               if not path.exists()]
    if missing:
        raise SystemExit(f"convert_perplexity.py: error: {missing[0]} is absent (the real models "
                         f"and their validation text live in ../shared)")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tok / "tokenizer.model"))
    ids = sp.encode((tok / "valid.txt").read_text(encoding="utf-8"))
    if args.windows:
        ids = ids[:args.windows * 255]
    print(f"valid.txt: {len(ids)} ids, {math.ceil(len(ids) / 255)} windows")
    # (--quant, --output-quant, --embedding-quant); None: the converter's default
    policies = [("f32", None, None), ("f16", None, None), ("bf16", None, None),
                ("q80", None, None), ("q40", "q40", None), ("q40", None, None),
                ("q40", "f32", None), ("q40", "q80", "q80"), ("q40", "q80", "f32")]
    print(f"{'model':16s} {'--quant':>7s} {'output':>6s} {'embed':>6s} {'MB':>6s} "
          f"{'f32 sync':>9s} {'vs f32':>7s} {'q80 sync':>9s} {'vs f32':>7s} {'vs ref':>7s}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            ref = json.loads((SHARED / name / "reference.json").read_text())
            ref = ref["valid_perplexity"]["perplexity"]
            base = None
            for quant, output, embedding in policies:
                started = time.perf_counter()
                out = Path(tmp) / f"{name}-{quant}-{output}-{embedding}.h5"
                _, reports = convert(SHARED / name / "hf", out, quant, output_quant=output,
                                     embedding_quant=embedding, log=lambda m: None)
                types = {r.name: r.quant for r in reports}
                # f32 sync isolates the weights' rounding; q80 is what runs by default
                ppl = {sync: perplexity(dllm.load(out, sync=sync, prefill_chunk=256), ids)
                       for sync in ("f32", "q80")}
                base = base or ppl["f32"]
                print(f"{name:16s} {quant:>7s} {types['output']:>6s} "
                      f"{types['tok_embeddings']:>6s} {out.stat().st_size / 1e6:6.2f} "
                      f"{ppl['f32']:9.4f} {ppl['f32'] / base - 1:7.2%} {ppl['q80']:9.4f} "
                      f"{ppl['q80'] / base - 1:7.2%} {ppl['q80'] / ref - 1:7.2%}  "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
