"""The engine loop of pipeline mode (--parallel pipeline): plans in flight fill the stages.

Petals' setting (Borzunov et al. 2023): every rank holds whole layers (dllm.pipeline), so a
token passes the stages one after another and one decoding sequence keeps one rank busy at
a time. With several sequences running, root splits them into as many plans as there are
stages and keeps all of those plans in flight: while rank 1 runs plan A's rows through its
layers, root runs plan B's through its own. A plan leaves out the sequences of the plans in
flight, whose next token is not known yet (Scheduler.next_plan(busy=...)).

    root:     while fewer plans than stages are in flight and one can be built:
                  plan = scheduler.next_plan(busy, groups=stages)
                  embedding; root's layers over its pool;      Send plan + x to rank 1
              else, the oldest plan:                           Recv its rows from rank n-1
                  final norm; classifier; scheduler.complete(plan, logits)
    rank r:   Recv plan + x from rank r-1; its layers over its pool; Send plan + x to r + 1
    rank n-1: ... Send the rows the plan wants logits of (none: an empty message) to root

Every rank's pool holds only its own layers of every block (engine.make_pool); the block
tables are root's and travel in the plan. MPI keeps the order of messages between two
ranks, so every stage runs the plans in the order root sent them: a block freed by a
cancelled sequence and given to another is written by its new owner only after the plans
of the old one have passed.

Each hop is two messages: a header (kind, rows, ints, body bytes), then the body: the
plan's segments as int64, then x's rows in the sync payload, packed as dllm.pipeline packs
them (so the tokens are those of dllm.generate --parallel pipeline). Waits: a stage waits
for the next header without a limit (a server idles as long as nobody asks); root's wait
for a plan in flight is bounded by --timeout, so a lost or stalled stage is found there.
"""
from collections import deque

import numpy as np

from ..kvcache import PagedStep
from ..pipeline import SPIN, TAG, SendPool

PLAN, RESULT, STOP = 0, 1, 2                    # message kinds
HEADER = 4                                      # int64: kind, rows, ints, body bytes
LOGITS_CODES = {None: 0, "last": 1, "all": 2}
LOGITS_KINDS = {code: kind for kind, code in LOGITS_CODES.items()}


def encode_segments(segments):
    """PagedStep segments [(block_table, start, n, logits)] -> flat int64 array."""
    ints = []
    for table, start, n, logits in segments:
        ints += [start, n, LOGITS_CODES[logits], len(table), *table]
    return np.asarray(ints, np.int64)


def decode_segments(ints):
    """The inverse of encode_segments."""
    segments, i = [], 0
    while i < len(ints):
        start, n, code, length = (int(v) for v in ints[i:i + 4])
        table = [int(b) for b in ints[i + 4:i + 4 + length]]
        segments.append((table, start, n, LOGITS_KINDS[code]))
        i += 4 + length
    return segments


class Ring:
    """This rank's messages to the next stage and from the previous one (root: from the
    last). payload: the model's SliceExchange of one row of x (PipelineModel.payload)."""

    def __init__(self, comm, payload):
        self.comm, self.payload = comm, payload
        self.next, self.prev = (comm.rank + 1) % comm.size, (comm.rank - 1) % comm.size
        self.sends = SendPool(comm)
        self.header = np.empty(HEADER * 8, np.uint8)
        self.body = np.empty(0, np.uint8)

    def send(self, dest, kind, segments=(), x=None):
        """Header and body to dest, nonblocking (the buffers are the pool's)."""
        ints = encode_segments(segments).view(np.uint8)
        rows = 0 if x is None else len(x)
        packed = self.payload.pack(x, 0) if rows else ints[:0]
        nbytes = ints.nbytes + packed.nbytes
        head = self.sends.buffer(HEADER * 8)
        head[:HEADER * 8].view(np.int64)[:] = (kind, rows, ints.nbytes // 8, nbytes)
        self.sends.send(head, HEADER * 8, dest)
        if nbytes:
            body = self.sends.buffer(nbytes)
            body[:ints.nbytes], body[ints.nbytes:nbytes] = ints, packed
            self.sends.send(body, nbytes, dest)

    def receive(self, source, idle=False):
        """The next message from source: (kind, segments, x (rows, dim) float32 or None).
        idle: the header may be long in coming (the watchdog sets no limit on it)."""
        if idle:
            with self.comm.unbounded():
                self.comm.recv_bytes(self.header, source, TAG, spin=SPIN)
        else:
            self.comm.recv_bytes(self.header, source, TAG, spin=SPIN)
        kind, rows, n_ints, nbytes = (int(v) for v in self.header.view(np.int64))
        if nbytes > self.body.nbytes:
            self.body = np.empty(nbytes, np.uint8)
        if nbytes:
            self.comm.recv_bytes(self.body, source, TAG, spin=SPIN)
        segments = decode_segments(self.body[:n_ints * 8].view(np.int64))
        x = self.payload.unpack(self.body[n_ints * 8:nbytes], rows) if rows else None
        return kind, segments, x


def run(comm, model, pool, scheduler=None, merged=False):
    """Serve in pipeline mode until root's scheduler says stop. Every rank calls it, root
    with its scheduler; model is a dllm.pipeline.PipelineModel, pool this rank's layers'
    BlockPool. merged: --batching fast (kvcache.PagedStep)."""
    ring = Ring(comm, model.payload)
    if comm.is_root:
        _serve_root(comm, model, pool, scheduler, merged, ring)
    else:
        _serve_stage(comm, model, pool, merged, ring)
    ring.sends.drain()


def _step(model, pool, segments, merged):
    return PagedStep(pool, segments, model.head_kv, model.kernels, merged)


def _serve_stage(comm, model, pool, merged, ring):
    """Rank > 0: run every plan through this rank's layers and pass it on, until STOP."""
    last = comm.rank == comm.size - 1
    while True:
        kind, segments, x = ring.receive(ring.prev, idle=True)
        if kind == STOP:
            if not last:
                ring.send(ring.next, STOP)
            return
        step = _step(model, pool, segments, merged)
        x = model.run_layers(x, 0, None, None, step)
        if not last:
            ring.send(ring.next, PLAN, segments, x)
        else:
            rows, _ = step.logit_rows()
            ring.send(0, RESULT, x=x[rows] if len(rows) else None)


def _serve_root(comm, model, pool, scheduler, merged, ring):
    """Root: keep up to one plan per stage in flight; complete each as it comes back."""
    in_flight = deque()           # (plan, step, logit rows of x when root is the only stage)
    while True:
        plan = None
        if len(in_flight) < comm.size:
            busy = {seq_id for p, _, _ in in_flight for seq_id in p.seq_ids}
            plan = scheduler.next_plan(busy=busy, groups=comm.size)
            if plan is None:                      # stop: finish what is in flight
                break
        if plan is not None and plan.tokens:
            in_flight.append(_submit(comm, model, pool, plan, merged, ring))
        else:                     # every stage has its plan, or nothing new can go yet
            _complete(comm, model, scheduler, ring, *in_flight.popleft())
    while in_flight:
        _complete(comm, model, scheduler, ring, *in_flight.popleft())
    if comm.size > 1:
        ring.send(ring.next, STOP)


def _submit(comm, model, pool, plan, merged, ring):
    """Root: the plan's rows through the embedding and root's layers, then on to rank 1."""
    step = _step(model, pool, plan.segments, merged)
    x = model.run_layers(model.embed(plan.tokens), 0, None, None, step)
    if comm.size == 1:
        return plan, step, x[step.logit_rows()[0]]
    ring.send(ring.next, PLAN, plan.segments, x)
    return plan, step, None


def _complete(comm, model, scheduler, ring, plan, step, x):
    """Root: the oldest plan's logit rows (from the last rank), classified and sampled."""
    if x is None:
        _, _, x = ring.receive(comm.size - 1)
    rows, kernels = step.logit_rows()
    logits = model.classify(x, kernels) if len(rows) else None      # final norm, classifier
    scheduler.complete(plan, logits)
