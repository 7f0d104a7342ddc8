"""One matrix of a loaded model, timed call by call, on 1 rank, on N ranks of one host, or in N
independent 1-rank processes at once: what sharing a host's memory does to a decode matmul.

    mpirun -n 1 python kernels/model_matmul_share.py --model m4/dllm.h5
    mpirun -n 2 python kernels/model_matmul_share.py --model m4/dllm.h5              # halves
    mpirun -n 2 python kernels/model_matmul_share.py --model m4/dllm.h5 --independent

Each rank multiplies one input row by every matrix of its layers in turn (as a decode step
streams them; no communication), `--calls` times, and reports the per-call times of
`--matrix` of those layers (min, p10, p50, p90, max; the first 10 calls left out). With
--independent every process loads the whole model (COMM_SELF), so N whole matrices stream at
once. Ranks print their own lines.
"""
import argparse
import time

import numpy as np

import dllm
from dllm.comm import Comm
from dllm.modelfile import LAYER_MATRICES


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--matrix", default="w1", choices=LAYER_MATRICES)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--independent", action="store_true")
    args = p.parse_args()
    world = Comm()
    comm = Comm.self_comm() if args.independent else world
    model = dllm.load(args.model, comm, max_seq_len=64)
    k = model.kernels
    inputs, times = {}, []
    world.mpi.Barrier()                   # every rank starts streaming at once
    for call in range(args.calls):
        layer = model.layers[call % len(model.layers)]
        for name in LAYER_MATRICES:
            w = layer[name]
            n = w.shape[1]
            if n not in inputs:
                inputs[n] = k.quantize_input(np.ones((1, n), np.float32))
            start = time.perf_counter()
            k.matmul(inputs[n], w)
            if name == args.matrix:
                times.append((time.perf_counter() - start) * 1e3)
    t = np.array(times[10:])
    print(f"rank {world.rank}: {args.matrix} {layer[args.matrix].shape} per call, ms: "
          f"min {t.min():.3f} p10 {np.percentile(t, 10):.3f} p50 {np.median(t):.3f} "
          f"p90 {np.percentile(t, 90):.3f} max {t.max():.3f}", flush=True)


if __name__ == "__main__":
    main()
