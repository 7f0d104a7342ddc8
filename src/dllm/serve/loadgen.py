"""python -m dllm.bench serve: a load generator for a running dllm.serve (or any
OpenAI-compatible server).

    python -m dllm.bench serve --url http://127.0.0.1:8000 --concurrency 1,2,4,8,16 \\
        --requests 32 --max-tokens 32 --out serving.jsonl --plot serving.png

At each concurrency c, c clients send streamed /v1/completions requests back to back
(--requests in all, fixed length: ignore_eos) and the generator times every server-sent
event: time to first token (TTFT), inter-token latency (ITL) between a request's tokens,
and the generated tokens per second of the whole level (tokens / wall time). Concurrency 1
is serving the same requests one at a time, the baseline every level is compared with.
One JSON line per level (with the server's /metrics KV figures at the end of it).
"""
import http.client
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import numpy as np

from ..atomic import append_line
from ..cli import ArgumentParser
from ..errors import DllmError

PROMPTS = ["Once upon a time, in a small village by the sea, there lived",
           "The history of the city begins in the year", "Here is a recipe for bread:",
           "In the beginning of the lecture the professor said that",
           "The spacecraft drifted slowly towards", "My favourite book is",
           "The weather report for tomorrow says", "A long time ago, a king"]


def build_parser():
    p = ArgumentParser(prog="python -m dllm.bench serve",
                       description="Measure a running server's throughput and latency.")
    p.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--concurrency", default="1,2,4,8,16",
                   help="comma-separated numbers of concurrent clients (default 1,2,4,8,16)")
    p.add_argument("--requests", type=int, default=None,
                   help="requests per level (default 2 x the concurrency, at least 4)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per reply (default 32)")
    p.add_argument("--api-key", default=None, help="bearer token, if the server wants one")
    p.add_argument("--label", default="", help="free text stored with every line (the setup)")
    p.add_argument("--out", default=None, help="append one JSON line per level here")
    p.add_argument("--plot", default=None, help="PNG of tokens/s and latency vs concurrency")
    return p


def main(comm, argv):
    args = build_parser().parse_args(argv)
    try:
        levels = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        raise DllmError(f"--concurrency must be numbers separated by commas, got "
                        f"{args.concurrency!r}") from None
    if not levels or min(levels) < 1:
        raise DllmError("--concurrency levels must be at least 1")
    if not comm.is_root:
        return 0
    url = urlparse(args.url)
    if url.scheme != "http" or not url.hostname:
        raise DllmError(f"--url must be http://HOST:PORT, got {args.url!r}")
    rows, baseline = [], None
    for c in levels:
        row = run_level(url, c, args.requests or max(4, 2 * c), args.max_tokens, args.api_key)
        baseline = baseline or row
        row.update(label=args.label, url=args.url,
                   speedup=row["tokens_per_s"] / baseline["tokens_per_s"],
                   itl_p99_ratio=row["itl_p99_ms"] / baseline["itl_p99_ms"])
        rows.append(row)
        print(f"concurrency {c:3d}: {row['tokens_per_s']:8.2f} tokens/s ({row['speedup']:.2f}x) "
              f"TTFT p50 {row['ttft_p50_ms']:8.1f} ms p99 {row['ttft_p99_ms']:8.1f}  ITL p50 "
              f"{row['itl_p50_ms']:7.1f} ms p99 {row['itl_p99_ms']:7.1f} ({row['itl_p99_ratio']:.2f}x)"
              f"  KV held/live {row['kv_held_per_live']}", flush=True)
        if args.out:
            append_line(args.out, json.dumps(row))
    if args.plot:
        plot(rows, args.plot)
    return 0


def run_level(url, concurrency, n_requests, max_tokens, api_key):
    """One concurrency level: n_requests streamed requests from `concurrency` clients."""
    results, kv = [], []
    stop = threading.Event()
    sampler = threading.Thread(target=sample_kv, args=(url, api_key, stop, kv), daemon=True)
    sampler.start()
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda i: one_request(url, i, max_tokens, api_key),
                                range(n_requests)))
    wall = time.perf_counter() - started
    stop.set()
    sampler.join()
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] for r in results]
    itl = [g for r in results for g in r["gaps"]]
    held = [h for h, live in kv if live]
    return {"concurrency": concurrency, "requests": n_requests, "max_tokens": max_tokens,
            "generated_tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
            "ttft_p50_ms": 1e3 * float(np.percentile(ttft, 50)),
            "ttft_p99_ms": 1e3 * float(np.percentile(ttft, 99)),
            "itl_p50_ms": 1e3 * float(np.percentile(itl, 50)) if itl else None,
            "itl_p99_ms": 1e3 * float(np.percentile(itl, 99)) if itl else None,
            # sum over the samples (every 0.25 s) of positions held / of positions written:
            # the KV memory held over the level against what its live tokens needed
            "kv_held_per_live": (round(sum(h for h, _ in kv) / sum(live for _, live in kv), 3)
                                 if held else None)}


def one_request(url, i, max_tokens, api_key):
    body = json.dumps({"model": "m", "prompt": PROMPTS[i % len(PROMPTS)],
                       "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                       "stream": True, "stream_options": {"include_usage": True}})
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=600)
    sent = time.perf_counter()
    conn.request("POST", "/v1/completions", body, headers)
    response = conn.getresponse()
    if response.status != 200:
        raise DllmError(f"the server answered {response.status}: {response.read()[:200]!r}")
    times, tokens = [], 0
    for line in response:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
        elif event["choices"] and event["choices"][0]["text"]:
            times.append(time.perf_counter())
    conn.close()
    return {"tokens": tokens, "ttft": times[0] - sent if times else float("nan"),
            "gaps": list(np.diff(times))}


def sample_kv(url, api_key, stop, out, period=0.25):
    """(KV positions the pool holds, positions the live tokens need) from /metrics."""
    while not stop.wait(period):
        try:
            conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=5)
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
            conn.close()
        except OSError:
            continue
        values = dict(line.split(" ", 1) for line in text.splitlines()
                      if line.startswith("dllm_kv_") and " " in line)
        used = float(values.get("dllm_kv_blocks_used", 0))
        live = float(values.get("dllm_kv_live_tokens", 0))
        out.append((used * float(values.get("dllm_kv_block_size", 16)), live))


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DllmError("--plot needs matplotlib: pip install 'dllm[bench]'") from None
    from ..atomic import replacing
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for label in dict.fromkeys(r["label"] for r in rows):
        mine = [r for r in rows if r["label"] == label]
        cs = [r["concurrency"] for r in mine]
        a.plot(cs, [r["tokens_per_s"] for r in mine], "o-", label=label or None)
        b.plot(cs, [r["itl_p99_ms"] for r in mine], "o-", label=f"{label} ITL p99")
        b.plot(cs, [r["ttft_p50_ms"] for r in mine], "s--", label=f"{label} TTFT p50")
    a.set(xscale="log", xlabel="concurrent requests", ylabel="generated tokens/s")
    b.set(xscale="log", yscale="log", xlabel="concurrent requests", ylabel="ms")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
