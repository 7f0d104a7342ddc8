"""Perplexity of the converted tinystories models on valid.txt, f32 and Q40, through the
library API with reference.json's documented method (docs/conversion.md records the output).

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
    print(f"valid.txt: {len(ids)} ids, {math.ceil(len(ids) / 255)} windows")
    print(f"{'model':16s} {'reference':>9s} {'f32':>9s} {'diff':>7s} {'Q40':>9s} {'vs f32':>7s}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            ref = json.loads((SHARED / name / "reference.json").read_text())
            ref = ref["valid_perplexity"]["perplexity"]
            result, started = {}, time.perf_counter()
            for quant, sync in (("f32", "f32"), ("q40", "q80")):
                out = Path(tmp) / f"{name}-{quant}.h5"
                convert(SHARED / name / "hf", out, quant, log=lambda m: None)
                result[quant] = perplexity(dllm.load(out, sync=sync, prefill_chunk=256), ids)
            print(f"{name:16s} {ref:9.4f} {result['f32']:9.4f} {result['f32'] / ref - 1:7.2%} "
                  f"{result['q40']:9.4f} {result['q40'] / result['f32'] - 1:7.2%}  "
                  f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
