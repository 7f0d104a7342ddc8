"""Iteration-level scheduling (ORCA, Yu et al. 2022) over a paged KV cache (vLLM). Root only.

Every iteration root builds one Plan: which running sequences step, their new tokens,
positions and block tables; root broadcasts it and every rank runs one forward of it
(dllm.serve.engine). Then root samples the sequences whose last token was in it.

- Requests join the running batch at any iteration (at most --max-running) and leave it
  when they finish or their client goes away (freed before the next plan is built).
- A prompt is prefilled in chunks of --prefill-chunk, cut at the same boundaries as
  dllm.generate cuts them (multiples of the chunk from position 0), so its numbers do not
  depend on the batch; at most --prefill-tokens prompt rows join each iteration's decoding
  rows, so a long prompt does not stall the others.
- Blocks are allocated as a sequence grows. When the pool runs out, the newest running
  sequence is preempted: its blocks are freed and it goes back to the front of the queue,
  to be recomputed later: its prompt in the same chunks, then each generated token as its
  own decoding row, exactly as it was first computed (the replay of generate_tokens), so no
  token changes.
"""
import collections
import itertools
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..kvcache import BLOCK_SIZE, BlockAllocator


@dataclass
class Plan:
    """One iteration, broadcast to every rank: tokens (T,) and segments in row order
    [(block_table, start, n, logits)] (kvcache.PagedStep), plus the sequence of each
    segment (root's bookkeeping, ids only)."""
    tokens: list
    segments: list
    seq_ids: list


@dataclass
class Sequence:
    """A request as the scheduler holds it (root).

    emit(kind, payload) is called from the engine thread: ("prompt_logprobs", list of
    (logprob, top)), ("token", (id, logprob, top)), ("done", finish_reason), ("error", text).
    """
    prompt: list
    max_tokens: int
    sampler: object
    emit: object
    stop_ids: frozenset = frozenset()   # ids that end the reply (EOS, end of turn)
    logprobs: int = None          # top alternatives per token (0: only the chosen), None: off
    echo_logprobs: bool = False   # log-probabilities of the prompt tokens too
    id: int = 0
    generated: list = field(default_factory=list)
    computed: int = 0             # positions in the KV cache
    reserved: int = 0             # positions written or being written (computed + rows
                                  # of the plan in flight): what its blocks must hold
    table: list = field(default_factory=list)
    cancelled: bool = False
    finished: bool = False
    arrival: float = field(default_factory=time.monotonic)
    last_token_time: float = None
    echoed: int = 0               # prompt positions whose log-probabilities were sent

    @property
    def tokens(self):
        return self.prompt + self.generated


class Scheduler:
    """Root's queue, running batch and block allocator. submit/cancel from any thread;
    next_plan/complete from the engine (main) thread."""

    def __init__(self, n_blocks, max_seq_len, prefill_chunk, max_running, max_queue,
                 prefill_tokens=None, block_size=BLOCK_SIZE, metrics=None):
        self.allocator = BlockAllocator(n_blocks)
        self.max_seq_len, self.prefill_chunk = max_seq_len, prefill_chunk
        self.max_running, self.max_queue = max_running, max_queue
        self.prefill_tokens = prefill_tokens or prefill_chunk
        self.block_size, self.metrics = block_size, metrics
        self.waiting = collections.deque()
        self.running = []             # oldest first
        self.lock = threading.Condition()
        self.ids = itertools.count(1)
        self.stopping = False

    # --- the API's side -----------------------------------------------------------------
    def submit(self, seq):
        """Queue a sequence; False when the queue is full (the API answers 429)."""
        with self.lock:
            if len(self.waiting) >= self.max_queue:
                return False
            seq.id = next(self.ids)
            self.waiting.append(seq)
            self.lock.notify()
            return True

    def cancel(self, seq):
        """The client went away or a stop string matched: freed before the next plan."""
        with self.lock:
            seq.cancelled = True
            self.lock.notify()

    def stop(self):
        with self.lock:
            self.stopping = True
            self.lock.notify()

    def snapshot(self):
        """(queued, running, blocks used, blocks free, positions per block, live tokens: the
        positions the running sequences have written or are writing) for /metrics."""
        with self.lock:
            live = sum(s.reserved for s in self.running)
            return (len(self.waiting), len(self.running), self.allocator.used,
                    len(self.allocator.free), self.block_size, live)

    # --- the engine's side ----------------------------------------------------------------
    def next_plan(self, idle_timeout=None, busy=frozenset(), groups=1):
        """The next iteration's Plan; waits while there is nothing to do. None: stop.

        Pipeline mode (dllm.serve.stages) keeps several plans in flight: busy holds the ids
        of the sequences in them, which this plan leaves out (their next rows depend on the
        result) and never preempts (their blocks are being written); while any are busy,
        an empty Plan means "nothing to add now" instead of a wait. groups: the plan takes
        at most 1/groups of the running sequences, so that they are shared among the
        stages."""
        with self.lock:
            while True:
                self._drop_cancelled()
                self._admit()
                if self.stopping:
                    return None
                if self.running:
                    plan = self._build(busy, groups)
                    if plan.tokens or busy:
                        return plan
                    continue          # everything preempted or deferred: admit again
                if busy:
                    return Plan([], [], [])
                self.lock.wait(idle_timeout)

    def _drop_cancelled(self):
        for seq in [s for s in self.running if s.cancelled or s.finished]:
            self._finish(seq, None)
        for seq in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(seq)

    def _admit(self):
        while self.waiting and len(self.running) < self.max_running:
            self.running.append(self.waiting.popleft())

    def _finish(self, seq, reason):
        if seq in self.running:
            self.running.remove(seq)
        self.allocator.release(seq.table)
        if reason is not None and not seq.finished:
            seq.emit("done", reason)
        seq.finished = True

    def _preempt(self, seq):
        """Free seq's blocks and queue it first: it is recomputed when there is room."""
        self.running.remove(seq)
        self.allocator.release(seq.table)
        seq.computed = seq.reserved = 0
        self.waiting.appendleft(seq)
        if self.metrics is not None:
            self.metrics.preemptions += 1

    def _build(self, busy=frozenset(), groups=1):
        tokens, segments, seq_ids = [], [], []
        prefill_budget = self.prefill_tokens
        max_sequences = -(-len(self.running) // groups)
        for seq in list(self.running):
            if seq not in self.running or seq.id in busy:   # preempted, or in flight
                continue
            if len(seq_ids) >= max_sequences:
                break
            start, n, logits = self._next_rows(seq)
            if start < len(seq.prompt):
                if prefill_budget <= 0:
                    continue
                prefill_budget -= n
            while not self.allocator.grow(seq.table, start + n, self.block_size):
                victim = [s for s in self.running if s.id not in busy][-1]   # seq at worst
                self._preempt(victim)
                if victim is seq:
                    break
            if seq not in self.running:
                continue
            seq.reserved = start + n
            tokens += seq.tokens[start:start + n]
            segments.append((list(seq.table), start, n, logits))
            seq_ids.append(seq.id)
        return Plan(tokens, segments, seq_ids)

    def _next_rows(self, seq):
        """(start, n, logits) of seq's rows in the next forward."""
        start, total = seq.computed, len(seq.tokens)
        if start < len(seq.prompt):   # a prefill chunk, cut where dllm.generate cuts it
            end = min((start // self.prefill_chunk + 1) * self.prefill_chunk, len(seq.prompt))
            if seq.echo_logprobs:
                return start, end - start, "all"
            return start, end - start, ("last" if end == total else None)
        # a decoding row; a replayed one (after a preemption) is not sampled
        return start, 1, ("last" if start + 1 == total else None)

    def complete(self, plan, logits):
        """Root, after the forward of plan: logits (rows the plan named, vocab) float32."""
        by_id = {s.id: s for s in self.running}
        row, now = 0, time.monotonic()
        with self.lock:
            for seq_id, (_, start, n, kind) in zip(plan.seq_ids, plan.segments):
                rows = {"all": n, "last": 1, None: 0}[kind]
                seq_logits, row = logits[row:row + rows] if rows else None, row + rows
                seq = by_id.get(seq_id)
                if seq is None or seq.cancelled or seq.finished:
                    continue
                seq.computed = start + n
                if kind == "all":
                    self._prompt_logprobs(seq, start, n, seq_logits)
                if kind is not None and seq.computed == len(seq.tokens):
                    self._sample(seq, seq_logits[-1], now)
            if self.metrics is not None:
                self.metrics.iterations += 1

    def _prompt_logprobs(self, seq, start, n, seq_logits):
        """Row p predicts token p + 1: the prompt tokens' log-probabilities (echo)."""
        out = [(None, None)] if seq.echoed == 0 else []     # the first token has none
        out += [token_logprob(seq_logits[i], seq.prompt[start + i + 1], seq.logprobs or 0)
                for i in range(n) if seq.echoed <= start + i + 1 < len(seq.prompt)]
        if out:        # a recomputed prompt (after a preemption) sends nothing twice
            seq.echoed += len(out)
            seq.emit("prompt_logprobs", out)

    def _sample(self, seq, row_logits, now):
        if len(seq.generated) >= seq.max_tokens:        # max_tokens 0 (echo only)
            self._finish(seq, "length")
            return
        token = int(seq.sampler.sample(row_logits))
        logprob, top = (token_logprob(row_logits, token, seq.logprobs)
                        if seq.logprobs is not None else (None, None))
        seq.generated.append(token)
        if self.metrics is not None:
            self.metrics.token(seq, now)
        seq.emit("token", (token, logprob, top))
        if token in seq.stop_ids:
            self._finish(seq, "stop")
        elif len(seq.generated) >= seq.max_tokens or len(seq.tokens) > self.max_seq_len:
            # as generate_tokens: the last token sampled needs no place in the cache
            self._finish(seq, "length")


def token_logprob(logits, token, top):
    """(log-probability of token, [(id, logprob)] of the `top` most likely) from raw
    logits (vocab,), in float64 as the sampler computes."""
    z = np.asarray(logits, np.float64)
    log_probs = z - z.max()
    log_probs -= np.log(np.exp(log_probs).sum())
    best = []
    if top:
        ids = np.argpartition(-log_probs, top - 1)[:top]
        ids = ids[np.argsort(-log_probs[ids], kind="stable")]
        best = [(int(i), float(log_probs[i])) for i in ids]
    return float(log_probs[token]), best
