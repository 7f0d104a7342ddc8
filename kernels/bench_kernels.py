"""Kernel lab: every hot kernel at Llama-2-7B shapes against this machine's own limits.

    python kernels/bench_kernels.py [--quick] [--json kernels.json]

Measured in the same run, on one thread (as one rank runs):
- memory bandwidth, STREAM-like (copy and triad over arrays far larger than the caches);
- BLAS float32 gemv / gemm rates of the same shapes (the f32 baseline the targets name);
- dllm's kernels: Q40 matrix-vector (decode) at full shapes and per-rank slices (1/2, 1/4,
  1/8 of the rows), Q40 matrix-matrix (prefill) at T = 16..256, Q80 quantize, rmsnorm,
  attention.
Reported: ms per call, ns per weight, GB/s of weight bytes streamed (Q40: 18 bytes per 32
weights), and the fraction of the memory-bandwidth roofline (the time the weight bytes alone
would take at the measured triad bandwidth). Each figure is the median of several repeats.
"""
import argparse
import json
import os
import platform
import statistics
import time

os.environ.setdefault("DLLM_THREADS", "1")
import dllm  # noqa: E402,F401  (pins BLAS threads before numpy loads)
import numpy as np  # noqa: E402

from dllm import kernels  # noqa: E402
from dllm.quant import quantize_q40, quantize_q80  # noqa: E402

SHAPES = {"wq/wo 4096x4096": (4096, 4096), "w1/w3 11008x4096": (11008, 4096),
          "w2 4096x11008": (4096, 11008)}


def timed(fn, repeats, min_seconds=0.2):
    """Median seconds of one call (each sample loops until it lasts min_seconds/repeats)."""
    fn()
    loops, t = 1, 0.0
    while True:
        start = time.perf_counter()
        for _ in range(loops):
            fn()
        t = time.perf_counter() - start
        if t >= min_seconds / repeats or loops >= 1 << 16:
            break
        loops *= 2
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(loops):
            fn()
        samples.append((time.perf_counter() - start) / loops)
    return statistics.median(samples)


def stream(n_values, repeats):
    a, b, c = (np.full(n_values, v, np.float32) for v in (1.0, 2.0, 0.0))
    copy = timed(lambda: np.copyto(c, a), repeats)
    def triad():
        np.multiply(b, np.float32(3.0), out=c)
        np.add(c, a, out=c)          # c = a + 3 b: reads a, b, c; writes c twice
    tri = timed(triad, repeats)
    return {"copy_GBps": 2 * a.nbytes / copy / 1e9, "triad_GBps": 5 * a.nbytes / tri / 1e9}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats and shapes")
    p.add_argument("--json", help="write all figures here")
    args = p.parse_args()
    repeats = 3 if args.quick else 5
    rng = np.random.default_rng(0)
    results = {"machine": {"python": platform.python_version(), "numpy": np.__version__,
                           "cpu": platform.processor() or platform.machine(),
                           "threads": os.environ.get("OPENBLAS_NUM_THREADS")}}
    bw = stream(1 << 25, repeats)   # 128 MB arrays
    results["stream"] = bw
    roof = bw["triad_GBps"] * 1e9
    print(f"memory bandwidth: copy {bw['copy_GBps']:.1f} GB/s, triad {bw['triad_GBps']:.1f} GB/s")

    rows = []
    print(f"\n{'kernel':34s} {'ms':>9} {'ns/weight':>10} {'GB/s':>7} {'roofline':>9} {'vs f32 BLAS':>11}")
    for label, (out_dim, in_dim) in SHAPES.items():
        w = (rng.standard_normal((out_dim, in_dim), dtype=np.float32) / np.sqrt(in_dim))
        w_q40 = quantize_q40(w)
        x = rng.standard_normal((1, in_dim), dtype=np.float32)
        fractions = (1, 2, 4, 8) if not args.quick else (1, 2)
        for frac in fractions:
            r = out_dim // frac
            n_weights = r * in_dim
            blas = timed(lambda: x @ w[:r].T, repeats)
            q40 = timed(lambda: kernels.matmul_q40(x, w_q40[:r]), repeats)
            q40_bytes = n_weights * 18 / 32
            name = f"Q40 gemv {label}" + (f" /{frac}" if frac > 1 else "")
            rows.append({"kernel": "q40_gemv", "shape": [r, in_dim], "T": 1, "ms": q40 * 1e3,
                         "ns_per_weight": q40 / n_weights * 1e9,
                         "GBps": q40_bytes / q40 / 1e9, "roofline": q40_bytes / roof / q40,
                         "f32_blas_ms": blas * 1e3, "ratio_to_f32_blas": q40 / blas,
                         "f32_blas_roofline": n_weights * 4 / roof / blas})
            row = rows[-1]
            print(f"{name:34s} {row['ms']:9.3f} {row['ns_per_weight']:10.3f} {row['GBps']:7.2f} "
                  f"{row['roofline']:9.1%} {row['ratio_to_f32_blas']:10.2f}x")
        for T in ((16, 64, 128, 256) if not args.quick else (16, 128)):
            X = rng.standard_normal((T, in_dim), dtype=np.float32)
            blas = timed(lambda: X @ w.T, repeats)
            q40 = timed(lambda: kernels.matmul_q40(X, w_q40), repeats)
            flops = 2 * T * out_dim * in_dim
            rows.append({"kernel": "q40_gemm", "shape": [out_dim, in_dim], "T": T,
                         "ms": q40 * 1e3, "GFLOPs": flops / q40 / 1e9,
                         "f32_blas_GFLOPs": flops / blas / 1e9,
                         "fraction_of_f32_blas_rate": blas / q40})
            row = rows[-1]
            print(f"{'Q40 gemm ' + label + f' T={T}':34s} {row['ms']:9.3f} {'':>10} "
                  f"{row['GFLOPs']:6.1f}GF {'':>9} {row['fraction_of_f32_blas_rate']:10.1%} of BLAS")

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
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
