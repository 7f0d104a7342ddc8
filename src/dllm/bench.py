"""python -m dllm.bench: per-token inference vs sync time, bytes per token, memory per rank.

    mpirun -n 2 python -m dllm.bench --model m.h5 --out results.jsonl
    mpirun -n 2 python -m dllm.bench --preset llama2-7b --layers 4 --out results.jsonl
    python -m dllm.bench table results.jsonl [--plot-dir docs/img]
    mpirun -n 2 python -m dllm.bench compare --model m.h5 [--sequences 1,2,4]

A run warms up, then times a prefill of --prompt-len tokens and --decode-tokens single-token
steps, with a barrier before each phase. Every rank's figures are gathered to root and
reported as min/median/max over ranks; one JSON line per run carries them with the run's
conditions, and `table` turns many lines (a 1/2/4/8-rank sweep) into the paper's table.
"""
import gc
import json
import os
import resource
import socket
import sys
import time
from pathlib import Path

import numpy as np

from .atomic import append_line, reason
from .checks import check_paths
from .cli import (ArgumentParser, add_engine_options, add_fault_options, add_kernel_options,
                  entry, load_model, model_loaded, run, use_fault_options)
from .errors import DllmError
from .benchplots import HEADER, row, table_main
from .stats import StepTimer, conditions, spread, summarize

PROG = "dllm.bench"


def build_parser(is_root=True):
    p = ArgumentParser(prog=f"python -m {PROG}", is_root=is_root, description=__doc__.splitlines()[0],
                       epilog="Also: 'python -m dllm.bench table RESULTS.jsonl [--plot-dir DIR]' "
                              "(the paper-style table and plots of many runs) and 'mpirun ... "
                              "python -m dllm.bench compare ...' (centralized vs tensor vs "
                              "pipeline); each has its own --help.")
    add_engine_options(p)     # the options of dllm.generate and dllm.eval, meaning the same
    p.add_argument("--preset", help="synthetic model of a real shape instead of --model "
                   "(llama2-7b, llama2-13b, llama2-70b, llama3-8b, tinyllama-1.1b)")
    p.add_argument("--layers", type=int, default=None, help="layers of the synthetic model")
    p.add_argument("--cache-dir", default="/tmp/dllm-synthetic",
                   help="where synthetic models are written once and reused, on a filesystem "
                        "every rank sees (default /tmp/dllm-synthetic; llama2-7b takes 3.8 GB)")
    p.add_argument("--prompt-len", type=int, default=64, help="prefill tokens (default 64)")
    p.add_argument("--decode-tokens", type=int, default=16, help="timed decode steps (default 16)")
    p.add_argument("--warmup", type=int, default=2, help="untimed decode steps first (default 2)")
    p.add_argument("--repeat", type=int, default=1, metavar="K",
                   help="measure K times (each a prefill and the decode steps); the line "
                        "carries the median repeat's figures, the spread over repeats and the "
                        "load average before each (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random token ids")
    p.add_argument("--out", help="append the run's JSON line to this file")
    add_fault_options(p)
    return p


def main(argv=None):
    return run(_main, argv, PROG)


def _main(comm, argv):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["table"]:
        return table_main(comm, argv[1:])
    if argv[:1] == ["compare"]:
        return compare_main(comm, argv[1:])
    if argv[:1] == ["serve"]:       # a load generator for python -m dllm.serve
        from .serve.loadgen import main as serve_main
        return serve_main(comm, argv[1:])
    args = build_parser(comm.is_root).parse_args(argv)
    comm.from_root(check_paths, args)
    use_fault_options(comm, args)
    if args.model is not None and args.preset is not None:
        raise DllmError("give exactly one of --model and --preset, not both")
    if args.preset is not None:
        args.model = comm.from_root(synthetic_model, args.preset, args.layers, args.cache_dir)
    need = args.prompt_len + args.warmup + args.decode_tokens
    if args.max_seq_len is None:
        # A KV cache of what the run uses, not the model's whole context (268 MB per rank
        # for Llama 2 7B's 4096 positions on one rank); the model's context is still checked.
        args.max_seq_len = need
    model = load_model(comm, args)
    model_loaded(comm)
    if need > model.max_seq_len:
        raise DllmError(f"--prompt-len + --warmup + --decode-tokens = {need} exceeds the "
                        f"context of {model.max_seq_len}")
    record = repeated(comm, model, args)
    if comm.is_root:
        record["conditions"].update(preset=args.preset, layers=args.layers)
        print(json.dumps(record), flush=True)
        print_row(record, file=sys.stderr)
        if args.out:
            append_line(args.out, json.dumps(record))
    return 0


def repeated(comm, model, args):
    """Collective: measure args.repeat times; root gets the median repeat's record (by total
    ms per token) with every repeat's figures and the load average of every host before it."""
    runs = []
    for _ in range(args.repeat):
        load = comm.gather((socket.gethostname(), os.getloadavg()[0]))
        record = measure(comm, model, args)
        if comm.is_root:
            runs.append((record, dict(load)))
    if not comm.is_root:
        return None
    order = sorted(range(len(runs)), key=lambda i: runs[i][0]["ms_per_token"]["total"])
    record = runs[order[len(order) // 2]][0]
    record["repeats"] = [{"ms_per_token": r["ms_per_token"], "load_average_1min": load}
                         for r, load in runs]
    record["spread_over_repeats"] = {
        key: spread([r["ms_per_token"][key] for r, _ in runs])
        for key in ("total", "inference", "sync")}
    return record


def synthetic_model(preset, layers, cache_dir):
    """Root: path of the synthetic model of `preset`, written once into cache_dir."""
    from .convert import convert_synthetic
    cache = Path(cache_dir)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DllmError(f"--cache-dir {cache_dir}: {reason(exc)}") from None
    path = cache / f"{preset}{f'-{layers}l' if layers else ''}-q40.h5"
    if not path.exists():
        convert_synthetic(preset, path, layers=layers, log=lambda message: None)
    return str(path)


def measure(comm, model, args):
    """Collective: warm-up, prefill, decode; returns the record on root (None elsewhere)."""
    rng = np.random.default_rng(args.seed)
    n_tokens = args.prompt_len + args.warmup + args.decode_tokens
    ids = rng.integers(3, model.config.vocab_size, size=n_tokens).tolist()
    prompt, rest = ids[:args.prompt_len], ids[args.prompt_len:]
    model.forward(prompt[:min(len(prompt), args.prefill_chunk)], 0, logits=None)  # warm caches

    timer = StepTimer(comm)
    comm.barrier()
    timer.mark()
    model.prefill(prompt, 0, "last")
    timer.lap("prefill", tokens=len(prompt))
    for step, token in enumerate(rest):
        if step == args.warmup:
            comm.barrier()
            timer.mark()
        model.forward([token], len(prompt) + step, logits="last")
        if step >= args.warmup:
            timer.lap("decode")
        else:
            timer.mark()

    memory = {"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "weights": int(sum(w.nbytes for w in model.weights.values())),
              "kv_cache": int(model.state.k_cache.nbytes + model.state.v_cache.nbytes)}
    memories = comm.gather(memory)
    # Every decode step's time: their median resists bursts of other work on a shared
    # machine better than the mean (ms_per_token), which one slow step can move.
    step_ms = comm.gather([1e3 * lap[1] for lap in timer.laps.get("decode", [])])
    summary = summarize(comm, timer)
    info = conditions(comm, model, weights_from=args.weights_from, prompt_len=args.prompt_len,
                      decode_tokens=args.decode_tokens, warmup=args.warmup)
    if not comm.is_root:
        return None
    summary.pop("generated_tokens", None)
    summary["memory_per_rank"] = {
        key: spread([m[key] for m in memories]) for key in ("peak_rss", "weights", "kv_cache")}
    held = [m for m in memories if m["weights"] + m["kv_cache"] > 0]   # never divide by 0
    summary["memory_per_rank"]["rss_over_weights_plus_kv"] = spread(
        [m["peak_rss"] / (m["weights"] + m["kv_cache"]) for m in held]) if held else None
    summary["decode_step_ms"] = {   # over the steps of each rank, then the median over ranks
        "min": float(np.median([min(s) for s in step_ms])),
        "median": float(np.median([np.median(s) for s in step_ms]))}
    return {"kind": "bench", **summary, "conditions": info,
            "model_config": model.config.to_dict(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def print_row(record, file):
    print(HEADER, file=file)
    print(row(record), file=file, flush=True)


# --- compare: the same model centralized, tensor-parallel and pipeline-parallel ---------------
MODES = ("centralized", "tensor", "pipeline")


def compare_parser(is_root=True):
    p = ArgumentParser(prog=f"python -m {PROG} compare", is_root=is_root,
                       description="The same model on 1 rank (centralized), tensor-parallel "
                       "and pipeline-parallel on the job's ranks: per-token latency, throughput "
                       "with k concurrent sequences, bytes per token, memory per rank, logits "
                       "agreement with the centralized run.")
    p.add_argument("--model", help="dllm HDF5 model file")
    p.add_argument("--preset", help="synthetic model of a real shape instead of --model")
    p.add_argument("--layers", type=int, default=None, help="layers of the synthetic model")
    p.add_argument("--cache-dir", default="/tmp/dllm-synthetic",
                   help="where synthetic models are written once and reused")
    p.add_argument("--sync", default="q80", choices=("q80", "f32"),
                   help="payload of tensor and pipeline runs (centralized computes in f32)")
    p.add_argument("--profile", default=None, metavar="PATH",
                   help="device profile for the tensor and pipeline runs")
    p.add_argument("--modes", default=",".join(MODES),
                   help=f"comma-separated subset of {','.join(MODES)} (default all)")
    p.add_argument("--sequences", default="1,2,4",
                   help="numbers k of concurrent sequences (default 1,2,4)")
    p.add_argument("--prompt-len", type=int, default=8, help="prompt tokens per sequence (8)")
    p.add_argument("--decode-tokens", type=int, default=8,
                   help="timed decode steps per sequence (default 8)")
    p.add_argument("--warmup", type=int, default=1, help="untimed decode steps first (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--out", help="append the comparison's JSON line to this file")
    add_kernel_options(p)
    # The other ranks wait while root runs the model alone, so every wait is held to
    # --load-timeout here (raise it for a large model), never to --timeout.
    add_fault_options(p)
    return p


def compare_main(comm, argv):
    """Collective: measure every mode in turn, print the table on root."""
    from .loading import load
    args = compare_parser(comm.is_root).parse_args(argv)
    comm.from_root(check_paths, args)
    use_fault_options(comm, args)
    if (args.model is None) == (args.preset is None):
        raise DllmError("give exactly one of --model and --preset")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        raise DllmError(f"--modes must name some of {', '.join(MODES)}, got {args.modes!r}")
    try:
        ks = sorted({int(k) for k in args.sequences.split(",")})
    except ValueError:
        raise DllmError(f"--sequences must be numbers such as 1,2,4, got {args.sequences!r}") from None
    if ks[0] < 1:
        raise DllmError(f"--sequences must be positive, got {args.sequences!r}")
    path = args.model or comm.from_root(synthetic_model, args.preset, args.layers, args.cache_dir)
    steps = args.warmup + args.decode_tokens + 1
    options = dict(max_seq_len=args.prompt_len + steps, prefill_chunk=max(args.prompt_len, 1),
                   kernels=args.kernels, threads=args.threads)
    records, reference = [], None
    for mode in modes:
        if mode == "centralized":   # root alone; the others sleep in a barrier
            record, reference = _centralized(comm, lambda: load(
                path, comm.self_comm(), sync="f32", **options), args, ks, steps)
        else:
            model = load(path, comm, sync=args.sync, parallel=mode, profile=args.profile,
                         **options)
            record, _ = measure_mode(mode, model, args, ks, steps, reference)
            del model
        gc.collect()
        records.append(record)
    if comm.is_root:
        result = {"kind": "compare", "modes": records, "sequences": ks,
                  "prompt_len": args.prompt_len, "decode_tokens": args.decode_tokens,
                  "warmup": args.warmup, "model": str(path), "preset": args.preset,
                  "layers": args.layers, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        print(compare_table(result))
        if args.out:
            append_line(args.out, json.dumps(result))
    return 0


def _centralized(comm, load_alone, args, ks, steps):
    """Root measures the model on COMM_SELF; every rank returns root's (record, logits)."""
    result, error = (None, None), None
    if comm.is_root:
        try:
            result = measure_mode("centralized", load_alone(), args, ks, steps, None)
        except DllmError as exc:
            error = str(exc)
    comm.idle_barrier()
    error = comm.bcast(error)
    if error is not None:
        raise DllmError(error)
    return result


def measure_mode(mode, model, args, ks, steps, reference):
    """Collective over model.comm: logits of one prompt, then k = ks sequences of `steps`
    tokens each. Returns (record, logits) on root, (None, None) elsewhere."""
    comm = model.comm
    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(3, model.config.vocab_size, size=(max(ks), args.prompt_len)).tolist()
    logits = model.logits(prompts[0] if comm.is_root else None)
    runs = {k: timed_sequences(model, prompts[:k], steps, args.warmup) for k in ks}
    cache = model.state.k_cache.nbytes + model.state.v_cache.nbytes
    unique = {id(w): w.nbytes for w in model.weights.values()}   # tied classifier counted once
    per_rank = comm.gather({"weights": int(sum(unique.values())), "kv_cache": int(cache),
                            "layers": list(getattr(model, "layer_range", ())),
                            "sent": runs[ks[0]]["sent"], "received": runs[ks[0]]["received"],
                            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})
    info = conditions(comm, model, prompt_len=args.prompt_len, decode_tokens=args.decode_tokens)
    if not comm.is_root:
        return None, None
    record = {"mode": mode, "world_size": comm.size,
              "ms_per_token": runs[ks[0]]["ms_per_token"],
              "tokens_per_s": {str(k): runs[k]["tokens_per_s"] for k in ks},
              "ms_per_token_per_sequence": {str(k): runs[k]["ms_per_token"] for k in ks},
              "per_rank": per_rank, "conditions": info}
    if reference is not None:
        record["logits_rel_error"] = float(np.abs(logits - reference).max() / np.abs(reference).max())
        record["argmax_agreement"] = float(np.mean(logits.argmax(-1) == reference.argmax(-1)))
    return record, logits


def timed_sequences(model, prompts, steps, warmup):
    """Collective: greedy-generate len(prompts) sequences of `steps` tokens together
    (dllm.pipeline.generate_many: interleaved on a pipeline, one after another otherwise).

    The timed window starts when the last sequence to start has produced warmup + 1 tokens
    (every sequence is then decoding) and ends with the last token: tokens_per_s counts the
    tokens in it; ms_per_token is the median gap between consecutive tokens of a sequence
    after its warmup; sent/received are this rank's bytes per token in the window."""
    from .pipeline import generate_many
    from .sampler import Sampler
    comm, k = model.comm, len(prompts)
    comm.barrier()
    times, counts, start, before = [[] for _ in range(k)], [0] * k, None, None
    for seq, _ in generate_many(model, prompts if comm.is_root else None, steps, Sampler(0.0),
                                stop_at_eos=False):
        now = time.perf_counter()
        times[seq].append(now)
        counts[seq] += 1
        if start is None and seq == k - 1 and counts[seq] == warmup + 1:
            start, before = now, comm.stats.snapshot()
    spent = comm.stats.since(before)
    in_window = sum(t > start for seq_times in times for t in seq_times)
    gaps = [b - a for seq_times in times for a, b in zip(seq_times[warmup:], seq_times[warmup + 1:])]
    return {"tokens_per_s": in_window / (max(max(t) for t in times) - start),
            "ms_per_token": 1e3 * float(np.median(gaps)),
            "sent": spent.bytes_sent / in_window, "received": spent.bytes_received / in_window}


def compare_table(result):
    ks = result["sequences"]
    head = (f"{'mode':<12} {'ranks':>5} {'ms/token':>9} " + " ".join(f"{f'tok/s k={k}':>10}" for k in ks)
            + f" {f'ms/tok k={ks[-1]}':>11} {'sent kB/tok':>11} {'recv kB/tok':>11} "
            f"{'weights MB/rank':>17} {'kv MB/rank':>11} {'logits err':>10} {'argmax':>6}")
    return "\n".join([head] + [_compare_row(r, ks) for r in result["modes"]])


def _megabytes(nbytes):
    """MB with the digits a small model needs: 0.47, 3.2, 173."""
    mb = nbytes / 1e6
    return f"{mb:.0f}" if mb >= 100 else f"{mb:.1f}" if mb >= 1 else f"{mb:.2f}"


def _compare_row(r, ks):
    ranks = r["per_rank"]
    err = f"{r['logits_rel_error']:10.2e}" if "logits_rel_error" in r else f"{'(ref)':>10}"
    agree = f"{r['argmax_agreement']:6.2f}" if "argmax_agreement" in r else f"{'':>6}"
    weights = "/".join(_megabytes(x["weights"]) for x in ranks)
    sent, received = (max(x[key] for x in ranks) / 1e3 for key in ("sent", "received"))
    return (f"{r['mode']:<12} {r['world_size']:>5} {r['ms_per_token']:9.1f} "
            + " ".join(f"{r['tokens_per_s'][str(k)]:10.2f}" for k in ks)
            + f" {r['ms_per_token_per_sequence'][str(ks[-1])]:11.1f} {sent:11.2f} {received:11.2f}"
            f" {weights:>17} {max(x['kv_cache'] for x in ranks) / 1e6:11.1f} {err} {agree}")


if __name__ == "__main__":
    entry(_main, PROG)
