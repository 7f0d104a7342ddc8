"""Kernel lab: every hot kernel at Llama-2-7B shapes against this machine's own limits.

    python kernels/bench_kernels.py [--quick] [--json kernels.json] [--baseline OLD_KERNELS.py]

Measured in the same run, on one thread (as one rank runs):
- memory bandwidth, STREAM-like (copy and triad over arrays far larger than the caches);
- BLAS float32 gemv / gemm rates of the same shapes (the f32 baseline the targets name);
- dllm's kernels, both backends (numpy, and fast when installed: Q4_0 x Q8_0 integer dots,
  the input's quantization included, by the C kernel where it runs, else numba): Q40
  matrix-vector (decode) at full shapes and per-rank slices (1/2, 1/4, 1/8 of the rows),
  beside it numba's decode kernel; Q40 matrix-matrix (prefill) at T = 16..256, beside it
  the fast backend's other prefill, dequantized tiles times BLAS (what runs without the C
  kernel) and at T = 16 numba's integer kernel for T rows; Q80 quantize, rmsnorm, attention.
Reported: ms per call, ns per weight, GB/s of weight bytes streamed (Q40: 18 bytes per 32
weights), the fraction of the memory-bandwidth roofline (the time the weight bytes alone
would take at the measured triad bandwidth), and for Q40 the bytes per weight held: the
matrix alone, and at the peak of a call with the kernel's scratch counted (numpy allocations
traced with tracemalloc). The end prints the performance targets of issues 4 and 11, met or
not.

A kernel and the baseline it is compared with are timed in turns (a, b, a, b, ...) and each
figure is the fastest of the samples: on a machine shared with other work, the load then
falls on both alike and the minimum is the least disturbed sample. --baseline PATH also times
the matmul_q40 of another copy of kernels.py in the same turns, for before/after figures:
`git show REV:src/dllm/kernels.py > /tmp/kernels_rev.py`.
"""
import argparse
import importlib.util
import json
import os
import platform
import subprocess
import time
import tracemalloc

import numpy as np

from dllm import _threads, kernels
from dllm.quant import quantize_q40, quantize_q80

try:
    from dllm import kernels_fast
except ImportError:             # numba not installed: the numpy backend alone
    kernels_fast = None

THREADS = _threads.use(int(os.environ.get("DLLM_THREADS") or 1))   # BLAS too, at run time

SHAPES = {"wq/wo 4096x4096": (4096, 4096), "w1/w3 11008x4096": (11008, 4096),
          "w2 4096x11008": (4096, 11008)}
# Issue 4, item 4 (the targets of the kernels; the whole-model ones are dllm.bench's).
GEMV_MAX_RATIO, MAX_BYTES_PER_WEIGHT, PREFILL_T, PREFILL_MIN_FRACTION = 4.0, 0.6, 128, 0.5
# Issue 11: the fast backend's decode matvec at most 0.6x the f32 BLAS gemv time.
FAST_GEMV_MAX_RATIO = 0.6


def timed_in_turns(fns, repeats, min_seconds=0.2):
    """{name: seconds of one call}: the fastest of `repeats` samples per function, sampled in
    turns; each sample loops the call until it lasts about min_seconds / repeats."""
    loops = {}
    for name, fn in fns.items():
        fn()
        n = 1
        while True:
            start = time.perf_counter()
            for _ in range(n):
                fn()
            if time.perf_counter() - start >= min_seconds / repeats or n >= 1 << 16:
                break
            n *= 2
        loops[name] = n
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(loops[name]):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / loops[name])
    return best


def timed(fn, repeats):
    return timed_in_turns({"fn": fn}, repeats)["fn"]


def peak_scratch(fn):
    """Bytes numpy allocates at the peak of one call of fn (its scratch and output)."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def load_baseline(path):
    """matmul_q40 of another copy of kernels.py (imported as a module of the dllm package)."""
    spec = importlib.util.spec_from_file_location("dllm._baseline_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.matmul_q40


def git_revision():
    here = os.path.dirname(os.path.abspath(__file__))
    run = subprocess.run(["git", "-C", here, "describe", "--always", "--dirty"],
                         capture_output=True, text=True)
    return run.stdout.strip() or None


def stream(n_values, repeats):
    a, b, c = (np.full(n_values, v, np.float32) for v in (1.0, 2.0, 0.0))

    def triad():
        np.multiply(b, np.float32(3.0), out=c)
        np.add(c, a, out=c)          # c = a + 3 b: reads a, b, c; writes c twice
    t = timed_in_turns({"copy": lambda: np.copyto(c, a), "triad": triad}, repeats)
    return {"copy_GBps": 2 * a.nbytes / t["copy"] / 1e9,
            "triad_GBps": 5 * a.nbytes / t["triad"] / 1e9}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats and shapes")
    p.add_argument("--json", help="write all figures here")
    p.add_argument("--baseline", metavar="PATH",
                   help="another kernels.py whose matmul_q40 is timed in the same turns")
    args = p.parse_args()
    repeats = 3 if args.quick else 7
    baseline = load_baseline(args.baseline) if args.baseline else None
    rng = np.random.default_rng(0)
    results = {"machine": {"python": platform.python_version(), "numpy": np.__version__,
                           "cpu": platform.processor() or platform.machine(),
                           "host": platform.node(), "cores": os.cpu_count(),
                           "load_average_at_start": os.getloadavg()[0],
                           "threads": THREADS,
                           "git_revision": git_revision(), "baseline": args.baseline}}
    bw = stream(1 << 25, repeats)   # 128 MB arrays
    results["stream"] = bw
    roof = bw["triad_GBps"] * 1e9
    print(f"memory bandwidth: copy {bw['copy_GBps']:.1f} GB/s, triad {bw['triad_GBps']:.1f} GB/s")

    rows = []
    print(f"\n{'kernel':34s} {'ms':>9} {'ns/weight':>10} {'GB/s':>7} {'roofline':>9} "
          f"{'vs f32 BLAS':>11} {'B/weight':>8} {'peak B/w':>8}"
          + ("  baseline ms" if baseline else "")
          + ("  | fast ms  ns/weight roofline vs BLAS peak B/w" if kernels_fast else ""))
    for label, (out_dim, in_dim) in SHAPES.items():
        # float32 throughout: a numpy float64 scalar would promote w (and the BLAS baseline)
        # to float64, twice the bytes of the f32 gemv the targets name.
        w = rng.standard_normal((out_dim, in_dim), dtype=np.float32) * np.float32(in_dim ** -0.5)
        assert w.dtype == np.float32
        w_q40 = quantize_q40(w)
        x = rng.standard_normal((1, in_dim), dtype=np.float32)
        fractions = (1, 2, 4, 8) if not args.quick else (1, 2)
        for frac in fractions:
            r = out_dim // frac
            n_weights, wr, qr = r * in_dim, w[:r], w_q40[:r]
            fns = {"blas": lambda: x @ wr.T, "q40": lambda: kernels.matmul_q40(x, qr)}
            if baseline:
                fns["baseline"] = lambda: baseline(x, qr)
            if kernels_fast:
                packed = kernels_fast.pack_q40(qr)
                fns["fast"] = lambda: kernels_fast.matmul(kernels_fast.quantize_input(x), packed)
                if kernels_fast.gemm_isa():
                    fns["numba"] = lambda: kernels_fast.gemv_q40_q80(
                        kernels_fast.quantize_input(x), packed)
            t = timed_in_turns(fns, repeats)
            q40, blas = t["q40"], t["blas"]
            q40_bytes = n_weights * 18 / 32
            name = f"Q40 gemv {label}" + (f" /{frac}" if frac > 1 else "")
            rows.append({"kernel": "q40_gemv", "shape": [r, in_dim], "T": 1, "ms": q40 * 1e3,
                         "ns_per_weight": q40 / n_weights * 1e9,
                         "GBps": q40_bytes / q40 / 1e9, "roofline": q40_bytes / roof / q40,
                         "f32_blas_ms": blas * 1e3, "ratio_to_f32_blas": q40 / blas,
                         "f32_blas_roofline": n_weights * 4 / roof / blas,
                         "bytes_per_weight": qr.nbytes / n_weights,
                         "peak_bytes_per_weight":
                             (qr.nbytes + peak_scratch(fns["q40"])) / n_weights})
            row = rows[-1]
            if baseline:
                row["baseline_ms"] = t["baseline"] * 1e3
            if kernels_fast:
                fast = t["fast"]
                row.update(fast_ms=fast * 1e3, fast_ns_per_weight=fast / n_weights * 1e9,
                           fast_roofline=q40_bytes / roof / fast,
                           fast_ratio_to_f32_blas=fast / blas,
                           fast_peak_bytes_per_weight=(packed.nbytes + peak_scratch(fns["fast"]))
                           / n_weights, fast_gemm=kernels_fast.gemm_isa() or "numba")
                if "numba" in t:
                    row["numba_ms"] = t["numba"] * 1e3
            print(f"{name:34s} {row['ms']:9.3f} {row['ns_per_weight']:10.3f} {row['GBps']:7.2f} "
                  f"{row['roofline']:9.1%} {row['ratio_to_f32_blas']:10.2f}x "
                  f"{row['bytes_per_weight']:8.4f} {row['peak_bytes_per_weight']:8.4f}"
                  + (f"  {row['baseline_ms']:11.3f}" if baseline else "")
                  + (f"  | {row['fast_ms']:7.3f} {row['fast_ns_per_weight']:9.3f} "
                     f"{row['fast_roofline']:8.1%} {row['fast_ratio_to_f32_blas']:6.2f}x "
                     f"{row['fast_peak_bytes_per_weight']:8.4f}" if kernels_fast else "")
                  + (f"  numba {row['numba_ms']:7.3f}" if "numba_ms" in row else ""))
        for T in ((16, 64, 128, 256) if not args.quick else (16, 128)):
            X = rng.standard_normal((T, in_dim), dtype=np.float32)
            fns = {"blas": lambda: X @ w.T, "q40": lambda: kernels.matmul_q40(X, w_q40)}
            if baseline:
                fns["baseline"] = lambda: baseline(X, w_q40)
            if kernels_fast:
                packed = kernels_fast.pack_q40(w_q40)
                fns["fast"] = lambda: kernels_fast.matmul(kernels_fast.quantize_input(X), packed)
                if kernels_fast.gemm_isa():
                    fns["tiles"] = lambda: kernels_fast.gemm_q40(X, packed)
                    if T == 16:    # numba's integer kernel for T rows (serving without C)
                        fns["numba"] = lambda: kernels_fast.gemm_rows_q40_q80(
                            kernels_fast.quantize_input(X), packed)
            t = timed_in_turns(fns, repeats)
            q40, blas = t["q40"], t["blas"]
            flops = 2 * T * out_dim * in_dim
            rows.append({"kernel": "q40_gemm", "shape": [out_dim, in_dim], "T": T,
                         "ms": q40 * 1e3, "GFLOPs": flops / q40 / 1e9,
                         "f32_blas_ms": blas * 1e3, "f32_blas_GFLOPs": flops / blas / 1e9,
                         "fraction_of_f32_blas_rate": blas / q40})
            row = rows[-1]
            if baseline:
                row["baseline_ms"] = t["baseline"] * 1e3
            if kernels_fast:
                row.update(fast_ms=t["fast"] * 1e3, fast_GFLOPs=flops / t["fast"] / 1e9,
                           fast_fraction_of_f32_blas_rate=blas / t["fast"],
                           fast_gemm=kernels_fast.gemm_isa() or "blas")
                if "tiles" in t:
                    row["tiles_ms"] = t["tiles"] * 1e3
                if "numba" in t:
                    row["numba_ms"] = t["numba"] * 1e3
            print(f"{'Q40 gemm ' + label + f' T={T}':34s} {row['ms']:9.3f} {'':>10} "
                  f"{row['GFLOPs']:6.1f}GF {'':>9} {row['fraction_of_f32_blas_rate']:10.1%} of BLAS"
                  f" ({row['f32_blas_GFLOPs']:.1f} GF)"
                  + (f"  {row['baseline_ms']:11.3f}" if baseline else "")
                  + (f"  | fast {row['fast_ms']:8.2f} ms {row['fast_fraction_of_f32_blas_rate']:6.1%}"
                     f" of BLAS" if kernels_fast else "")
                  + (f", tiles+BLAS {row['tiles_ms']:8.2f} ms" if "tiles_ms" in row else "")
                  + (f", numba {row['numba_ms']:8.2f} ms" if "numba_ms" in row else ""))

    for width in (4096, 11008):
        v = rng.standard_normal((1, width), dtype=np.float32)
        t = timed(lambda: quantize_q80(v), repeats)
        rows.append({"kernel": "q80_quantize", "shape": [1, width], "ms": t * 1e3,
                     "ns_per_value": t / width * 1e9})
        print(f"{'Q80 quantize 1x' + str(width):34s} {t * 1e3:9.4f} {t / width * 1e9:10.3f}")
    xn = rng.standard_normal((1, 4096), dtype=np.float32)
    weight = np.ones(4096, np.float32)
    t = timed(lambda: kernels.rmsnorm(xn, weight, 1e-5), repeats)
    rows.append({"kernel": "rmsnorm", "shape": [1, 4096], "ms": t * 1e3})
    print(f"{'rmsnorm 1x4096':34s} {t * 1e3:9.4f}")
    for seq in (128, 1024):
        q = rng.standard_normal((1, 32, 128), dtype=np.float32)
        kc = rng.standard_normal((32, seq, 128), dtype=np.float32)
        vc = rng.standard_normal((32, seq, 128), dtype=np.float32)
        t = timed(lambda: kernels.attention(q, kc, vc, seq - 1, np.arange(32)), repeats)
        kv_bytes = 2 * kc.nbytes
        rows.append({"kernel": "attention", "heads": 32, "head_dim": 128, "seq": seq,
                     "ms": t * 1e3, "GBps": kv_bytes / t / 1e9, "roofline": kv_bytes / roof / t})
        print(f"{f'attention 32x128 heads, seq {seq}':34s} {t * 1e3:9.3f} {'':>10} "
              f"{kv_bytes / t / 1e9:7.2f} {kv_bytes / roof / t:9.1%}")
    results["kernels"] = rows
    results["targets"] = targets(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def targets(rows):
    """Issue 4's kernel targets at the three full shapes: print and return them, met or not."""
    print("\ntargets (issue 4, item 4; issue 11)")
    found = []
    for row in rows:
        full = tuple(row.get("shape", ())) in SHAPES.values()
        for prefix, name, max_ratio in (("", "Q40", GEMV_MAX_RATIO),
                                        ("fast_", "fast", FAST_GEMV_MAX_RATIO)):
            if row["kernel"] != "q40_gemv" or not full or f"{prefix}peak_bytes_per_weight" \
                    not in row:
                continue
            shape = f"{row['shape'][0]}x{row['shape'][1]}"
            ratio, held = row[f"{prefix}ratio_to_f32_blas"], row[f"{prefix}peak_bytes_per_weight"]
            found.append({"target": f"{name} gemv {shape} <= {max_ratio:g}x f32 BLAS gemv",
                          "measured": ratio, "met": ratio <= max_ratio})
            found.append({"target": f"{name} gemv {shape} holds <= {MAX_BYTES_PER_WEIGHT} "
                          f"bytes/weight (scratch counted)",
                          "measured": held, "met": held <= MAX_BYTES_PER_WEIGHT})
        if row["kernel"] == "q40_gemm" and row["T"] == PREFILL_T:
            found.append({"target": f"Q40 gemm {row['shape'][0]}x{row['shape'][1]} T={PREFILL_T} "
                          f">= {PREFILL_MIN_FRACTION:.0%} of the f32 BLAS gemm rate",
                          "measured": row["fraction_of_f32_blas_rate"],
                          "met": row["fraction_of_f32_blas_rate"] >= PREFILL_MIN_FRACTION})
    for t in found:
        print(f"  {'met ' if t['met'] else 'MISS'}  {t['target']:62s} measured {t['measured']:.3f}")
    return found


if __name__ == "__main__":
    main()
