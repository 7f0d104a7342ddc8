"""What the page size does to a decode matmul: eight different 11008 x 4096 Q4_0 matrices
(200 MB, beyond the caches) multiplied by one input row in turn, as dllm.kernels_fast packs
them (prefer_huge_pages: 2 MB pages where Linux gives them) and copied into memory advised
MADV_NOHUGEPAGE (4 KB pages), best of 5 passes each, in weight bytes per second.

    python kernels/huge_pages.py

Linux only (madvise); prints the process's AnonHugePages after each step.
"""
import mmap

import numpy as np

from dllm import _threads
from dllm.quant import quantize_q40


def anon_huge_mb():
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("AnonHugePages"):
            return int(line.split()[1]) // 1024
    return 0


def copy_in_small_pages(a):
    """a copied into a private anonymous mapping advised MADV_NOHUGEPAGE."""
    region = mmap.mmap(-1, a.nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_NOHUGEPAGE)
    out = np.frombuffer(region, np.uint8, a.nbytes).view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def main():
    import time
    _threads.use(1)
    from dllm import kernels_fast as kf
    rng = np.random.default_rng(0)
    stored = quantize_q40(rng.standard_normal((11008, 4096), dtype=np.float32))
    packed = []
    for i in range(8):
        w = kf.pack_q40(np.roll(stored, i, axis=0))
        kf.prefer_huge_pages(w.codes)
        packed.append(w)
    print(f"packed: AnonHugePages {anon_huge_mb()} MB")
    x = kf.quantize_input(rng.standard_normal((1, 4096)).astype(np.float32))
    nbytes = sum(w.codes.nbytes + w.scales.nbytes for w in packed)

    def rate(ws):
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for w in ws:
                kf.matmul(x, w)
            best = min(best, time.perf_counter() - start)
        return nbytes / best / 1e9

    huge = rate(packed)
    small = [kf.Q40Packed(w.rows, w.n, copy_in_small_pages(w.codes), copy_in_small_pages(w.scales),
                          w.tail_codes, w.tail_scales) for w in packed]
    del packed
    print(f"4 KB copies: AnonHugePages {anon_huge_mb()} MB")
    print(f"as packed {huge:.1f} GB/s, in 4 KB pages {rate(small):.1f} GB/s")


if __name__ == "__main__":
    main()
