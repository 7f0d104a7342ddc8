"""dllm beside Distributed Llama 0.16.4 ("the peer") on the same weights, runs interleaved.

    python kernels/peer_side_by_side.py --peer-bin BIN --models DIR[,DIR...] [--nodes 1,2]
        [--rounds 3] [--threads-vs-ranks] [--out runs.jsonl]

Each DIR is one of ../shared/peer/make-models' outputs (model.m, tokenizer.t, hf/) with
dllm's conversion of hf/ beside it as DIR/dllm.h5 (python -m dllm.convert DIR/hf -o
DIR/dllm.h5 --quant q40). Every round runs, for each model and node count, the peer
(../shared/peer/run: 1 thread per process, Q80 sync, 128 prompt tokens prefilled in batches of
32, 32 predictions) and then dllm.bench (Q80 sync, 128 random prompt tokens in chunks of 64,
2 warm-up then 32 timed decode steps) under mpirun; --threads-vs-ranks adds dllm on 1 rank x N
threads for each N of --nodes above 1. Rounds alternate the tools so that a burst of other
work on a shared machine falls on both.

Figures per run: decode ms per token (peer: its closing mean of Pred + Sync; dllm: the mean of
the timed steps, median over ranks) and prefill ms per token (peer: its closing Evaluation
mean; dllm: 1000 / prefill tokens per second). Printed: min / median / max over the rounds and
dllm / peer of the medians. Every run's record is appended to --out as a JSON line.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER = ROOT.parent / "shared" / "peer"
PROMPT_TOKENS, STEPS, WARMUP = 128, 32, 2


def run_peer(bin_path, model_dir, nodes):
    cmd = [str(PEER / "run"), "--bin", bin_path, "--model", str(model_dir / "model.m"),
           "--tokenizer", str(model_dir / "tokenizer.t"), "--nodes", str(nodes)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        sys.exit(f"peer failed: {done.stderr.strip()[-500:]}")
    record = json.loads(done.stdout.strip().splitlines()[-1])
    return {"tool": "peer", "decode_ms": record["ms_per_token"]["decode"]["mean"],
            "prefill_ms": record["ms_per_token"]["prefill"]["mean"],
            "prefill_tokens": record["prefill_tokens"], "raw": record}


def run_dllm(model_dir, ranks, threads=1, kernels=None):
    mpirun = Path(sys.executable).parent / "mpirun"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.jsonl"
        cmd = [str(mpirun if mpirun.exists() else "mpirun"), "-n", str(ranks), sys.executable,
               "-m", "dllm.bench", "--model", str(model_dir / "dllm.h5"), "--max-seq-len", "256",
               "--prompt-len", str(PROMPT_TOKENS), "--decode-tokens", str(STEPS), "--warmup",
               str(WARMUP), "--threads", str(threads), "--out", str(out)]
        if kernels:
            cmd += ["--kernels", kernels]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            sys.exit(f"dllm failed: {done.stderr.strip()[-500:]}")
        record = json.loads(out.read_text().splitlines()[-1])
    return {"tool": "dllm", "decode_ms": record["ms_per_token"]["total"],
            "sync_ms": record["ms_per_token"]["sync"],
            "prefill_ms": 1000.0 / record["prefill_tokens_per_s"],
            "kernels": record["conditions"]["kernels"], "raw": record}


def spread(values):
    return min(values), statistics.median(values), max(values)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peer-bin", required=True, help="the dllama binary (../shared/peer/build)")
    p.add_argument("--models", required=True, help="comma-separated make-models folders")
    p.add_argument("--nodes", default="1,2", help="node (rank) counts (default 1,2)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads-vs-ranks", action="store_true",
                   help="also dllm on 1 rank with N threads for each N > 1 of --nodes")
    p.add_argument("--kernels", default=None, help="dllm's --kernels (default: its choice)")
    p.add_argument("--out", help="append every run's record here (JSON lines)")
    args = p.parse_args()
    models = [Path(m) for m in args.models.split(",")]
    nodes = [int(n) for n in args.nodes.split(",")]
    results = {}
    for round_ in range(args.rounds):
        for model in models:
            for n in nodes:
                runs = [("peer", n, 1, lambda: run_peer(args.peer_bin, model, n)),
                        ("dllm", n, 1, lambda: run_dllm(model, n, 1, args.kernels))]
                if args.threads_vs_ranks and n > 1:
                    runs.append(("dllm", 1, n, lambda: run_dllm(model, 1, n, args.kernels)))
                for tool, ranks, threads, fn in runs:
                    load = os.getloadavg()[0]
                    record = fn()
                    record.update(round=round_, model=str(model), ranks=ranks,
                                  threads=threads, loadavg_before=load)
                    results.setdefault((model.name, tool, ranks, threads), []).append(record)
                    print(f"round {round_} {model.name} {tool} {ranks} rank(s) x {threads} "
                          f"thread(s): decode {record['decode_ms']:.1f} ms/token, prefill "
                          f"{record['prefill_ms']:.1f} ms/token (load {load:.2f})", flush=True)
                    if args.out:
                        with open(args.out, "a") as f:
                            f.write(json.dumps(record) + "\n")
    print(f"\n{'model':6s} {'ranks x threads':>15s} {'peer decode':>20s} {'dllm decode':>20s} "
          f"{'ratio':>6s} {'peer prefill':>20s} {'dllm prefill':>20s} {'ratio':>6s}")
    for model in models:
        for n in nodes:
            peer = results[(model.name, "peer", n, 1)]
            rows = [(f"{n} x 1", results[(model.name, "dllm", n, 1)])]
            if n > 1 and (model.name, "dllm", 1, n) in results:
                rows.append((f"1 x {n}", results[(model.name, "dllm", 1, n)]))
            for label, dllm in rows:
                cells = []
                for key in ("decode_ms", "prefill_ms"):
                    a, b = spread([r[key] for r in peer]), spread([r[key] for r in dllm])
                    cells += ["{:.1f} / {:.1f} / {:.1f}".format(*a),
                              "{:.1f} / {:.1f} / {:.1f}".format(*b), f"{b[1] / a[1]:.2f}x"]
                print(f"{model.name:6s} {label:>15s} {cells[0]:>20s} {cells[1]:>20s} "
                      f"{cells[2]:>6s} {cells[3]:>20s} {cells[4]:>20s} {cells[5]:>6s}")


if __name__ == "__main__":
    main()
