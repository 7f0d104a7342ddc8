"""Pipeline parallelism (Petals; llama.cpp's MPI backend): every rank owns whole layers.

Rank r owns the contiguous layers [a_r, a_r+1) with all their rows and its own KV cache; root
(rank 0, the first stage) also owns the token embedding, the final norm and the classifier.
A token's activation travels root -> 1 -> ... -> n-1 -> root, so only one rank works on a
given token at a time and one sequence decodes no faster than on one rank. With several
sequences in flight (micro-batches) the ranks work on different sequences at once, so
throughput grows with the ranks while the latency of one token does not.

One token through the system (Q80 carries 32 values in 34 bytes; f32 in 128):

| step                                   | who              | communication                          |
|----------------------------------------|------------------|----------------------------------------|
| id -> x (dim)                          | root             | -                                      |
| layers [a_0, a_1)                      | root             | Send header + x (dim) to rank 1        |
| layers [a_r, a_r+1)                    | rank r           | Recv; Send header + x to rank r + 1    |
| layers [a_n-1, L)                      | rank n - 1       | Send header + x (last row) to root     |
| final norm; classifier; sample next id | root             | -                                      |

That is n messages of HEADER_BYTES + one dim row per token on n ranks (none on one rank):
each rank sends one and receives one. A prompt chunk of T tokens travels as one message of
T rows; chunks that need no logits stop at the last rank.

No collectives: every rank serves the messages coming from the previous rank, in order (MPI
keeps the order of messages between two ranks), until one carries the FINAL flag. The header
(sequence, position, rows, flags, token) tells a rank which KV cache to use and where, and
carries each sampled token, so every rank yields the generated tokens as root does.

Sends are nonblocking into a pool of buffers that is never waited on in the middle of an
operation: a rank blocks only in Recv, so the ring cannot deadlock when messages outgrow
MPI's eager limit (root sends chunk 2 while rank n-1 sends chunk 1's result back).
"""
from collections import deque

import numpy as np

from .backend import make as make_kernels
from .comm import Comm
from .errors import DllmError
from .model import Model, check_prompt
from .shard import plan
from .sync import SliceExchange

HEADER_FIELDS = ("seq", "pos", "rows", "flags", "token")
HEADER_BYTES = 8 * len(HEADER_FIELDS)   # int64 each
LOGITS_LAST, LOGITS_ALL, STOP, FINAL = 1, 2, 4, 8   # header flags
LOGITS_FLAGS = {None: 0, "last": LOGITS_LAST, "all": LOGITS_ALL}
TAG = 61
SPIN = 0.002   # seconds a waiting rank polls before it sleeps between polls (Comm.recv_bytes)


class SendPool:
    """Send buffers, each reused once MPI has finished with it; never waited on mid-operation."""

    def __init__(self, comm):
        self.comm, self.free, self.busy = comm, [], []

    def buffer(self, nbytes):
        still = []
        for request, buf in self.busy:
            if self.comm.test(request):
                self.free.append(buf)
            else:
                still.append((request, buf))
        self.busy = still
        for i, buf in enumerate(self.free):
            if buf.nbytes >= nbytes:
                return self.free.pop(i)
        return np.empty(nbytes, dtype=np.uint8)

    def send(self, buf, nbytes, dest):
        self.busy.append((self.comm.isend_bytes(buf[:nbytes], dest, TAG), buf))

    def drain(self):
        """End of an operation: every message sent has a receiver that will take it."""
        for request, buf in self.busy:
            self.comm.wait(request)
            self.free.append(buf)
        self.busy = []


class PipelineModel(Model):
    """A Llama model split by layers over the ranks of `comm`; built by ``dllm.load(...,
    parallel="pipeline")``. Same public API as dllm.model.Model, plus generate_many.

    The engine is Model's: this rank's layers run Model.run_layers as a tensor-parallel
    group of one rank (COMM_SELF), so every activation is rounded to the sync payload as in
    tensor mode; what differs is only where layers live and that x travels rank to rank.

    stages: (start, stop) layer range of every rank, contiguous and covering all layers in
    rank order (every rank but root holds at least one; dllm.profile.pipeline_stages).
    weights: this rank's arrays keyed by dataset name (placement.stage_entries), prepared.
    profile: the device profile the stages follow, or None; reserve_sequences checks its
    memory.
    """

    def __init__(self, comm, config, stages, weights, types, sync="q80", max_seq_len=None,
                 prefill_chunk=64, tokenizer=None, path=None, profile=None, kernels=None):
        kernels = kernels or make_kernels()
        if comm.is_root and "output" not in weights:     # tied: the embedding's rows
            table = weights["tok_embeddings"]
            weights["output"] = kernels.prepare(table.data, table.wtype.name)
        super().__init__(comm, config, plan(config, 1), weights, types, sync=sync,
                         max_seq_len=max_seq_len, prefill_chunk=prefill_chunk,
                         tokenizer=tokenizer, path=path, kernels=kernels,
                         group=Comm.self_comm(), layer_range=stages[comm.rank])
        self.scheme, self.stages, self.profile = "pipeline", list(stages), profile
        self.payload = SliceExchange([config.dim], sync, self.kernels)  # one row of x
        self.row_bytes = self.payload.row_bytes[0]
        self.next_rank, self.prev_rank = (comm.rank + 1) % comm.size, (comm.rank - 1) % comm.size
        self.is_last = comm.rank == comm.size - 1
        self.pool, self.local_results = SendPool(comm), deque()
        self.recv_buffer = np.empty(0, dtype=np.uint8)
        self.state.k_cache, self.state.v_cache = self.kv_caches(1)
        self._reserve_rows(prefill_chunk)

    def _reserve_rows(self, rows):
        """Receive buffer for messages of up to `rows` rows (every rank knows the bound)."""
        nbytes = HEADER_BYTES + rows * self.row_bytes
        if self.recv_buffer.nbytes < nbytes:
            self.recv_buffer = np.empty(nbytes, dtype=np.uint8)

    def reserve_sequences(self, k):
        """KV cache slots for k sequences in flight (reallocated, so caches start empty).
        Raises DllmError on every rank when they would exceed a rank's memory in the
        profile (every rank checks every rank)."""
        if self.state.k_cache.shape[0] < k:
            if self.profile is not None:
                from .profile import check_stage_memory
                check_stage_memory(self.config, self.types, self.profile, self.stages,
                                   self.max_seq_len, k)
            self.state.k_cache, self.state.v_cache = self.kv_caches(k)

    @property
    def layout(self):
        """How the model is split, for the run's conditions (dllm.stats.conditions)."""
        return {"layers_per_rank": [stop - start for start, stop in self.stages]}

    def run_stage(self, x, seq, pos):
        """x (T, dim) float32 at positions pos..pos+T-1 of sequence slot `seq` through this
        rank's layers (Model.run_layers), filling their KV cache; the new residual stream."""
        return self.run_layers(x, pos, self.state.k_cache[seq], self.state.v_cache[seq])

    # --- messages ----------------------------------------------------------------------------
    def _send(self, header, x=None):
        """Header (seq, pos, rows, flags, token) and x's rows to the next rank."""
        rows = 0 if x is None else len(x)
        nbytes = HEADER_BYTES + rows * self.row_bytes
        buf = self.pool.buffer(nbytes)
        seq, pos, _, flags, token = header
        buf[:HEADER_BYTES].view(np.int64)[:] = (seq, pos, rows, flags, token)
        if rows:
            buf[HEADER_BYTES:nbytes] = self.payload.pack(x, 0)
        self.pool.send(buf, nbytes, self.next_rank)

    def _receive(self):
        """The next message from the previous rank: (header tuple, x (rows, dim) or None)."""
        self.comm.recv_bytes(self.recv_buffer, self.prev_rank, TAG, spin=SPIN)
        header = tuple(int(v) for v in self.recv_buffer[:HEADER_BYTES].view(np.int64))
        rows = header[2]
        if rows == 0:
            return header, None
        payload = self.recv_buffer[HEADER_BYTES:HEADER_BYTES + rows * self.row_bytes]
        return header, self.payload.unpack(payload, rows)

    def _submit(self, seq, tokens, pos, flags, token=-1):
        """Root: embed tokens, run root's layers, pass x on (or keep the result locally when
        root is the only rank). Rows needed for logits go back to root at the end."""
        x = self.run_stage(self.embed(tokens), seq, pos)
        header = (seq, pos, len(tokens), flags, token)
        if self.comm.size > 1:
            self._send(header, x)
        elif flags & (LOGITS_LAST | LOGITS_ALL):
            self.local_results.append((header, x[-1:] if flags & LOGITS_LAST else x))

    def _stop(self, seq, token, final):
        """Root: sequence `seq` ended with `token`; tell the other ranks."""
        if self.comm.size > 1:
            self._send((seq, -1, 0, STOP | (FINAL if final else 0), token))

    def _collect(self, classify=True):
        """Root: the next block back from the last rank -> (seq, logits (rows, vocab))."""
        if self.comm.size == 1:
            header, x = self.local_results.popleft()
        else:
            header, x = self._receive()
        return header[0], self.classify(x) if classify else None

    def _serve(self):
        """Rank > 0: run and pass on messages until the FINAL one; yields (seq, token) for
        every generated token that passes (decode blocks and STOP messages carry them).
        Closed early (the caller stopped iterating), it serves on silently to the FINAL
        message, so that the ring is empty for the next operation."""
        final = False
        try:
            while not final:
                seq, token, final = self._serve_one()
                if token >= 0:
                    yield seq, token
        finally:
            while not final:
                _, _, final = self._serve_one()
            self.pool.drain()

    def _serve_one(self):
        """Rank > 0: receive one message, run it through this rank's layers, pass it on."""
        header, x = self._receive()
        seq, pos, rows, flags, token = header
        if flags & STOP:
            if not self.is_last:
                self._send(header)
        else:
            x = self.run_stage(x, seq, pos)
            if not self.is_last:
                self._send(header, x)
            elif flags & LOGITS_LAST:
                self._send(header, x[-1:])
            elif flags & LOGITS_ALL:
                self._send(header, x)
        return seq, token, bool(flags & FINAL)

    # --- the forward pass: one block of one sequence ------------------------------------------
    def forward(self, tokens, pos, logits="last", seq=0):
        """Run tokens (T,) of sequence slot `seq` at positions pos..pos+T-1 through the model,
        filling the KV caches. Every rank calls with the same tokens. logits: "last"
        (1, vocab), "all" (T, vocab) or None; returned on root, None elsewhere."""
        return self.prefill(tokens, pos, logits, seq, chunk=len(tokens))

    def prefill(self, ids, pos=0, logits="last", seq=0, chunk=None):
        """The prefill loop of pipeline mode: ids at positions pos.. of sequence slot `seq`
        in blocks of `chunk` (default prefill_chunk) tokens, all in flight at once, so
        that the ranks work on different blocks at the same time (pipelined prefill).
        logits as Model.prefill. Collective."""
        T, chunk = len(ids), chunk or self.prefill_chunk
        self.check_span(pos, T)
        if not 0 <= seq < self.state.k_cache.shape[0]:
            raise DllmError(f"sequence slot {seq} does not exist (reserve_sequences)")
        self._reserve_rows(chunk)
        if not self.comm.is_root:
            for _ in self._serve():
                pass
            return None
        starts = list(range(0, T, chunk))
        for start in starts:
            last = start == starts[-1]
            flags = LOGITS_FLAGS[logits if logits == "all" or last else None]
            self._submit(seq, ids[start:start + chunk], pos + start, flags | (FINAL if last else 0))
        wanted = len(starts) if logits == "all" else int(logits is not None)
        outputs = [self._collect()[1] for _ in range(wanted)]
        self.pool.drain()
        return np.concatenate(outputs) if outputs else None

    # --- library API --------------------------------------------------------------------------
    def _bcast_prompts(self, prompts):
        """Root's list of prompts (lists of ids) on every rank, checked on every rank."""
        comm = self.comm
        prompts = comm.bcast([[int(t) for t in p] for p in prompts]
                             if comm.is_root and prompts is not None else None)
        if not prompts:
            raise DllmError("no tokens given")
        for ids in prompts:
            check_prompt(ids, self.config.vocab_size, self.max_seq_len)
        return prompts

    def _chunks(self, ids):
        return [(s, ids[s:s + self.prefill_chunk]) for s in range(0, len(ids), self.prefill_chunk)]

    def generate(self, prompt_ids, steps, sampler, stop_at_eos=True):
        """Yield new token ids (on every rank), at most `steps` of them or until the context
        is full; stops after EOS when stop_at_eos. Collective: every rank iterates it."""
        prompts = None if prompt_ids is None else [prompt_ids]
        tokens = self.generate_many(prompts, steps, sampler, stop_at_eos)
        try:
            for _, token in tokens:
                yield token
        finally:
            tokens.close()    # stopped early: generate_many empties the ring

    def generate_many(self, prompts, steps, sampler, stop_at_eos=True):
        """Generate k sequences at once, each in its own KV cache slot, interleaved so that
        the ranks work on different sequences at the same time (micro-batches).

        prompts: k lists of ids (root's are used). sampler: one Sampler, or one per sequence.
        Yields (sequence index, token id) on every rank, in the order root samples them.
        Collective: every rank iterates it; a rank may stop early (close the generator): the
        sequences in flight are then finished without more tokens."""
        prompts = self._bcast_prompts(prompts)
        k, eos = len(prompts), self.config.eos_id
        self.reserve_sequences(k)
        self._reserve_rows(self.prefill_chunk)
        if not self.comm.is_root:
            yield from self._serve()
            return
        samplers = list(sampler) if isinstance(sampler, (list, tuple)) else [sampler] * k
        limits = [min(steps, self.max_seq_len - len(ids) + 1) for ids in prompts]
        for seq, ids in enumerate(prompts):           # prefill every sequence, chunks in flight
            chunks = self._chunks(ids)
            for i, (start, chunk) in enumerate(chunks):
                self._submit(seq, chunk, start, LOGITS_LAST if i == len(chunks) - 1 else 0)
        produced, pos, active = [0] * k, [len(ids) for ids in prompts], set(range(k))
        try:
            while active:
                seq, logits = self._collect()
                token = samplers[seq].sample(logits[-1])
                produced[seq] += 1
                if produced[seq] >= limits[seq] or (stop_at_eos and token == eos):
                    active.discard(seq)
                    self._stop(seq, token, final=not active)
                else:     # the next step goes out before the caller sees the token
                    self._submit(seq, [token], pos[seq], LOGITS_LAST, token)
                    pos[seq] += 1
                yield seq, token
        finally:
            for _ in range(len(active)):            # closed early: one block per sequence
                self._collect(classify=False)       # is on its way back
            for i, seq in enumerate(sorted(active)):
                self._stop(seq, -1, final=i == len(active) - 1)
            self.pool.drain()


def generate_many(model, prompts, steps, sampler, stop_at_eos=True):
    """k sequences on any model: interleaved on a PipelineModel; one after another on a
    tensor-parallel Model, which decodes one sequence at a time (its throughput does not grow
    with k). Yields (sequence index, token id) on every rank; collective."""
    if hasattr(model, "generate_many"):
        yield from model.generate_many(prompts, steps, sampler, stop_at_eos)
        return
    k = model.comm.bcast(len(prompts) if model.comm.is_root else None)
    samplers = list(sampler) if isinstance(sampler, (list, tuple)) else [sampler] * k
    for seq in range(k):
        ids = prompts[seq] if model.comm.is_root else None
        for token in model.generate(ids, steps, samplers[seq], stop_at_eos):
            yield seq, token
