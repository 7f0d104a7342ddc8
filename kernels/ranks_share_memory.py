"""What N ranks on one host do to each other's memory bandwidth: the ceiling of decode scaling.

    mpirun -n N python kernels/ranks_share_memory.py [--rounds 5]

Decoding streams every weight once per token, so a rank's decode time follows the memory
bandwidth it gets. Each rank here holds 16 different copies of its 1/N of the 7B-shaped w1
(11008 x 4096, Q4_0, packed as the fast backend holds it; about 200 MB at N = 2, far more
than the caches, as a decode step's weights are) and times, in turns, (a) one pass of
matvecs over all of them with the other ranks idle at a barrier, one rank at a time, and (b)
the same on every rank at once;
and the same for a float32 triad (STREAM) over 128 MB arrays. The ratio (b)/(a) is what
sharing the host costs each rank: 1.0 on separate machines; on a host whose memory system
two cores saturate it is well above 1, and N ranks can then decode at most N / ratio times
faster than one. Root prints per-rank times (min and median over all timed passes) and the
ratios.
"""
import argparse
import time

import numpy as np

from dllm import _threads
from dllm.comm import Comm
from dllm.quant import quantize_q40


def timed(fn, repeats=5):
    """Seconds of each of `repeats` calls of fn, after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    _threads.use(1)
    from dllm import kernels_fast as kf
    comm = Comm()
    n, rank = comm.size, comm.rank
    rng = np.random.default_rng(rank)
    rows = 11008 // n // 128 * 128
    w_q40 = quantize_q40(rng.standard_normal((rows, 4096), dtype=np.float32))
    ws = [kf.pack_q40(w_q40.copy()) for _ in range(16)]
    x = kf.quantize_input(rng.standard_normal((1, 4096), dtype=np.float32))
    a, b, c = (np.full(1 << 25, v, np.float32) for v in (1.0, 2.0, 0.0))

    def triad():
        np.multiply(b, np.float32(3.0), out=c)
        np.add(c, a, out=c)

    kernels = {"matvecs": lambda: [kf.matmul(x, w) for w in ws], "triad": triad}
    alone = {k: [] for k in kernels}
    together = {k: [] for k in kernels}
    for _ in range(args.rounds):
        for name, fn in kernels.items():
            for r in range(n):              # one rank at a time, the others wait
                comm.mpi.Barrier()
                if r == rank:
                    alone[name] += timed(fn)
            comm.mpi.Barrier()              # every rank at once
            together[name] += timed(fn)
    gathered = comm.gather((alone, together))
    if comm.is_root:
        print(f"{n} rank(s); per rank: 16 w1 slices of {rows} x 4096 Q4_0 "
              f"({sum(w.nbytes for w in ws) / 1e6:.0f} MB), triad over 3 x 128 MB; "
              f"ms per pass, min and median of {args.rounds * 5} per rank")
        for name in kernels:
            for stat, f in (("min", np.min), ("median", np.median)):
                a_ms = [f(a[name]) * 1e3 for a, _ in gathered]
                t_ms = [f(t[name]) * 1e3 for _, t in gathered]
                print(f"{name:7s} {stat:6s} alone {' '.join(f'{v:7.2f}' for v in a_ms)}"
                      f" | together {' '.join(f'{v:7.2f}' for v in t_ms)}"
                      f" | together / alone {' '.join(f'{t / a:.2f}' for a, t in zip(a_ms, t_ms))}")

if __name__ == "__main__":
    main()
