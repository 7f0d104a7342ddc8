"""Data-parallel gradient sync: buckets of gradients summed over the ranks while the
backward goes on (as PyTorch DDP does), with three payloads.

Gradients come out of the backward in grad_order (classifier first, embedding last); they
are packed into buckets of about `bucket_bytes` float32 bytes in that order, and a bucket's
exchange starts (non-blocking) the moment its last gradient is ready. Each gradient is of the
global-mean loss already (local sum / tokens of the global batch), so the sum is the mean.

payload f32: Iallreduce (sum) in place; a rank sends 2 (n-1)/n 4N bytes (a ring's traffic).
payload q80: the bucket in Q8_0 blocks, chunk c (whole blocks) to rank c by Ialltoallv, which
    adds the chunks in rank order and Iallgatherv's the Q8_0-rounded sum (reduce-scatter +
    allgather, the inference's sync scheme "reduce"): 2 (n-1)/n 34 N/32 bytes.
payload topk:K: each rank's ceil(K N) largest-magnitude entries of gradient + residual (error
    feedback), int32 index + float32 value, by Iallgatherv: (n-1) 8 ceil(K N) bytes.

q80 and top-k ranks add the same bytes in the same order, and MPICH's Allreduce gives every
rank the same sum, so the replicated weights stay bit-identical across ranks (tested). docs/training.md gives the formula per step.
"""
import math

import numpy as np

from ..errors import DllmError
from ..quant import dequantize_q80, quantize_q80
from ..shard import blocked_rows
from ..sync import BLOCK, Q80_BLOCK_BYTES

PAYLOADS = ("f32", "q80", "topk")


def parse_grad_sync(text):
    """'f32', 'q80' or 'topk:K' (K the kept fraction, 0 < K <= 1) -> (payload, K)."""
    name, _, value = text.partition(":")
    if name in ("f32", "q80") and not value:
        return name, None
    if name == "topk":
        try:
            fraction = float(value)
        except ValueError:
            fraction = math.nan
        if 0 < fraction <= 1:
            return name, fraction
        raise DllmError(f"--grad-sync topk:K needs a kept fraction 0 < K <= 1, got {value!r}")
    raise DllmError(f"--grad-sync must be f32, q80 or topk:K, got {text!r}")


def make_buckets(names, shapes, bucket_bytes):
    """Consecutive groups of `names` (in ready order) of at least bucket_bytes float32
    bytes each (the last may be smaller)."""
    buckets, current, size = [], [], 0
    for name in names:
        current.append(name)
        size += 4 * math.prod(shapes[name])
        if size >= bucket_bytes:
            buckets.append(current)
            current, size = [], 0
    if current:
        buckets.append(current)
    return buckets


class Bucket:
    """One bucket's gradients in flight: its flat buffer, requests and phase."""

    def __init__(self, names, shapes):
        self.names = names
        self.sizes = [math.prod(shapes[n]) for n in names]
        self.shapes = [shapes[n] for n in names]
        self.n = sum(self.sizes)
        self.flat = None
        self.requests = []
        self.send = None         # the payload in flight, kept alive until it completes
        self.phase = 0           # 0 waiting for gradients, 1.. exchanges, done = -1

    def split(self, flat):
        out, at = {}, 0
        for name, size, shape in zip(self.names, self.sizes, self.shapes):
            out[name] = flat[at:at + size].reshape(shape)
            at += size
        return out


class GradSync:
    """Sum gradients over the ranks of `comm` in buckets; one instance per run (it keeps
    top-k's residuals from step to step). Collective: every rank feeds the same names.

    Use: ready(names, grads) as the backward hands out gradients (the on_ready of
    model.loss_and_grads), then finish() -> {name: summed float32 gradient}."""

    def __init__(self, comm, names, shapes, grad_sync="f32", bucket_bytes=1 << 18):
        self.comm = comm
        self.payload, self.fraction = parse_grad_sync(grad_sync)
        self.buckets = [Bucket(b, shapes) for b in make_buckets(names, shapes, bucket_bytes)]
        self.bucket_of = {n: i for i, b in enumerate(self.buckets) for n in b.names}
        self.residuals = [np.zeros(b.n, np.float32) for b in self.buckets] \
            if self.payload == "topk" else None
        self._ready = set()
        self.wait_seconds = 0.0   # of the last finish(): blocked waiting, the unhidden part

    # --- the step -----------------------------------------------------------------------
    def ready(self, names, grads):
        """Mark gradients final; start every bucket now complete, then drive the others."""
        self._ready.update(names)
        for i in sorted({self.bucket_of[n] for n in names}):
            bucket = self.buckets[i]
            if bucket.phase == 0 and all(n in self._ready for n in bucket.names):
                bucket.flat = np.concatenate([np.ravel(grads[n]) for n in bucket.names]
                                             ).astype(np.float32)
                self._start(i, bucket)
        self._progress()

    def finish(self):
        """Wait for every bucket; returns the summed gradients (float32, by name)."""
        missing = [b.names[0] for b in self.buckets if b.phase == 0]
        if missing:
            raise RuntimeError(f"gradients never handed to the sync: {missing[:3]}")
        before = self.comm.stats.sync_seconds
        # Bucket by bucket in order, so that every rank starts q80's second exchanges in
        # the same order (MPI matches collectives by the order they are started in).
        for i, bucket in enumerate(self.buckets):
            while bucket.phase != -1:
                self.comm.wait_all(bucket.requests, "Waitall (gradient buckets)")
                self._advance(i, bucket)
        self.wait_seconds = self.comm.stats.sync_seconds - before
        out = {}
        for bucket in self.buckets:
            out.update(bucket.split(bucket.flat))
            bucket.phase, bucket.flat, bucket.requests, bucket.send = 0, None, [], None
        self._ready.clear()
        return out

    def _progress(self):
        """Let MPI move the buckets in flight (it progresses non-blocking collectives only
        inside MPI calls: Testall is one), and finish those whose exchange is complete,
        except where that would start another collective: this rank's timing must not
        decide the order of collectives, which every rank must start alike."""
        for i, bucket in enumerate(self.buckets):
            if bucket.phase > 0 and self.comm.test_all(bucket.requests) and not (
                    self.payload == "q80" and bucket.phase == 1):
                self._advance(i, bucket)

    # --- the payloads -------------------------------------------------------------------
    def _start(self, i, bucket):
        bucket.phase = 1
        if self.payload == "f32":
            bucket.requests = [self.comm.iallreduce_sum(bucket.flat)]
        elif self.payload == "q80":
            self._start_q80(bucket)
        else:
            self._start_topk(i, bucket)

    def _advance(self, i, bucket):
        if self.payload == "q80" and bucket.phase == 1:
            self._gather_q80(bucket)
            bucket.phase = 2
            return
        if self.payload == "q80":
            bucket.flat = dequantize_q80(bucket.recv).reshape(-1)[:bucket.n]
        elif self.payload == "topk":
            bucket.flat = self._sum_topk(bucket)
        bucket.phase, bucket.requests = -1, []

    def _start_q80(self, bucket):
        """Reduce-scatter's first half: chunk c (whole Q8_0 blocks) of the quantized
        gradient to rank c."""
        comm, blocks = self.comm, -(-bucket.n // BLOCK)
        padded = np.zeros(blocks * BLOCK, np.float32)
        padded[:bucket.n] = bucket.flat
        bucket.chunks = blocked_rows(blocks, comm.size, unit=1)       # block ranges per rank
        send = quantize_q80(padded.reshape(-1, BLOCK)).reshape(-1)
        counts = [(b - a) * Q80_BLOCK_BYTES for a, b in bucket.chunks]
        a, b = bucket.chunks[comm.rank]
        mine = (b - a) * Q80_BLOCK_BYTES
        bucket.recv = np.empty(mine * comm.size, np.uint8)
        bucket.send = send      # a non-blocking send's buffer must outlive the call
        bucket.requests = [comm.ialltoallv_bytes(send, counts, bucket.recv, [mine] * comm.size)]

    def _gather_q80(self, bucket):
        """Sum this rank's chunk over the ranks (in rank order), round it to Q8_0 again and
        Allgatherv the rounded sums; every rank then decodes the same bytes."""
        comm = self.comm
        a, b = bucket.chunks[comm.rank]
        parts = dequantize_q80(bucket.recv.reshape(comm.size, b - a, Q80_BLOCK_BYTES))
        summed = np.zeros((b - a, BLOCK), np.float32)
        for r in range(comm.size):
            summed += parts[r]
        counts = [(y - x) * Q80_BLOCK_BYTES for x, y in bucket.chunks]
        bucket.recv = np.empty((sum(counts) // Q80_BLOCK_BYTES, Q80_BLOCK_BYTES), np.uint8)
        send = quantize_q80(summed).reshape(-1)
        bucket.send = send
        bucket.requests = [comm.iallgatherv_bytes(send, bucket.recv.reshape(-1), counts)]

    def _start_topk(self, i, bucket):
        """Keep the k largest |gradient + residual| entries; the rest stays in the residual
        for the next steps (error feedback)."""
        total = self.residuals[i]
        total += bucket.flat
        k = max(1, math.ceil(self.fraction * bucket.n))
        keep = np.sort(np.argpartition(np.abs(total), bucket.n - k)[bucket.n - k:])
        send = np.empty(2 * k, np.int32)
        send[:k] = keep
        send[k:] = total[keep].view(np.int32)
        total[keep] = 0
        bucket.k = k
        bucket.recv = np.empty(2 * k * self.comm.size, np.int32)
        counts = [8 * k] * self.comm.size
        bucket.send = send
        bucket.requests = [self.comm.iallgatherv_bytes(send.view(np.uint8),
                                                       bucket.recv.view(np.uint8), counts)]

    def _sum_topk(self, bucket):
        dense, k = np.zeros(bucket.n, np.float32), bucket.k
        for part in bucket.recv.reshape(self.comm.size, 2 * k):   # rank order
            dense[part[:k]] += part[k:].view(np.float32)          # indices unique per rank
        return dense

    # --- checkpoints --------------------------------------------------------------------
    def state(self):
        """This rank's residuals (top-k), to checkpoint; None for the other payloads."""
        return None if self.residuals is None else np.concatenate(self.residuals)

    def restore(self, flat):
        if self.residuals is None:
            return
        if flat is None or flat.size != sum(r.size for r in self.residuals):
            raise DllmError("the checkpoint holds no top-k residuals of this model")
        at = 0
        for r in self.residuals:
            r[:] = flat[at:at + r.size]
            at += r.size


def bytes_per_step(payload, fraction, bucket_sizes, size, rank=0):
    """Gradient bytes `rank` of `size` sends per step by the formula of the module docstring
    (it receives as many), for buckets of the given value counts; what comm counts."""
    total = 0
    for n in bucket_sizes:
        if size == 1:
            continue
        if payload == "f32":
            total += 2 * (size - 1) * 4 * n // size
        elif payload == "q80":
            blocks = -(-n // BLOCK)
            a, b = blocked_rows(blocks, size, unit=1)[rank]
            # the other ranks' chunks once each, then its own summed chunk to n-1 ranks
            total += Q80_BLOCK_BYTES * ((blocks - (b - a)) + (size - 1) * (b - a))
        else:
            total += (size - 1) * 8 * max(1, math.ceil(fraction * n))
    return total
