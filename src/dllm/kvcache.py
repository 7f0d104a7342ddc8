"""KV caches behind Model.forward: the contiguous one of a single sequence, and a paged one
(vLLM's PagedAttention, Kwon et al. 2023) shared by the many sequences of a server.

Model.run_layers asks a *step* object for three things: the position of every row it carries
(RoPE), where to write the rows' keys and values (`write`), and the attention of its query
rows (`attend`); and the kernels that multiply its rows (`kernels`, see RowSegments).

- ContiguousStep: one sequence at positions pos..pos+T-1 of RunState's (layers, kv heads,
  max_seq_len, head_dim) cache, as dllm.generate runs it. This is the reference.
- PagedStep: T rows of many sequences, each at its own positions, in fixed-size blocks of a
  BlockPool through per-sequence block tables. Each rank's pool holds only its own part of
  every block: its kv heads (tensor mode) or its layers (a pipeline stage), so the
  cluster's KV capacity grows with the ranks (InfiniteLLM's point).

Blocks are allocated and freed on root only (BlockAllocator, driven by dllm.serve's
scheduler); every rank's pool is plain storage that the broadcast plan indexes.
"""
import math

import numpy as np

from .errors import DllmError
from .kernels import attention

BLOCK_SIZE = 16      # positions per block (vLLM's default)


# --- the contiguous cache of one sequence (the reference) ---------------------------------

class ContiguousStep:
    """Rows pos..pos+T-1 of one sequence in contiguous caches k_caches, v_caches (layers,
    local kv heads, max_seq_len, head_dim), as Model.run_layers has always filled them."""

    def __init__(self, k_caches, v_caches, pos, T, head_kv, kernels):
        self.k_caches, self.v_caches = k_caches, v_caches
        self.pos, self.T, self.head_kv = pos, T, head_kv
        self.positions = np.arange(pos, pos + T)
        self.kernels = kernels

    def write(self, layer, k, v):
        """k, v (T, local kv heads, hd) float32 into positions pos..pos+T-1."""
        self.k_caches[layer][:, self.pos:self.pos + self.T] = k.transpose(1, 0, 2)
        self.v_caches[layer][:, self.pos:self.pos + self.T] = v.transpose(1, 0, 2)

    def attend(self, layer, q):
        """q (T, local heads, hd) -> (T, local heads * hd), causal over the cache."""
        return self.kernels.attention(q, self.k_caches[layer], self.v_caches[layer], self.pos,
                                      self.head_kv)


# --- the paged cache ------------------------------------------------------------------------

class BlockPool:
    """Every rank's KV storage: n_blocks blocks of block_size positions of this rank's layers
    and kv heads.

    k, v: (layers held, n_blocks, local kv heads, block_size, head_dim) float32.
    """

    def __init__(self, n_layers, n_kv_heads, head_dim, n_blocks, block_size=BLOCK_SIZE):
        shape = (n_layers, n_blocks, n_kv_heads, block_size, head_dim)
        self.k, self.v = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        self.n_blocks, self.block_size = n_blocks, block_size

    @property
    def nbytes(self):
        return self.k.nbytes + self.v.nbytes


def blocks_for_memory(n_layers, n_kv_heads, head_dim, memory_bytes, block_size=BLOCK_SIZE):
    """How many blocks of this rank's layers and kv heads fit in memory_bytes (keys and
    values); None when the rank caches nothing (a pipeline root may hold no layers, star's
    other ranks no kv heads)."""
    per_block = 2 * 4 * n_layers * n_kv_heads * block_size * head_dim
    return memory_bytes // per_block if per_block else None


class BlockAllocator:
    """Root's free list of a pool's blocks."""

    def __init__(self, n_blocks):
        self.n_blocks = n_blocks
        self.free = list(range(n_blocks - 1, -1, -1))   # pop() hands out 0, 1, 2, ...

    @property
    def used(self):
        return self.n_blocks - len(self.free)

    def grow(self, table, positions, block_size=BLOCK_SIZE):
        """Extend block table `table` (a list, in place) to hold `positions` positions;
        False (table unchanged) when the pool has too few free blocks."""
        needed = -(-positions // block_size) - len(table)
        if needed > len(self.free):
            return False
        table.extend(self.free.pop() for _ in range(max(needed, 0)))
        return True

    def release(self, table):
        self.free.extend(reversed(table))
        table.clear()


def paged_attention(q, k_blocks, v_blocks, block_table, pos, head_kv, attend=attention):
    """Causal attention of T queries at positions pos..pos+T-1 of one sequence whose keys
    and values lie in the blocks `block_table` (ints) of k_blocks, v_blocks (n_blocks, KV,
    block_size, hd). q (T, H, hd) float32 -> (T, H * hd). The reference twin is
    kernels.attention over the contiguous cache: the blocks are gathered into one
    (KV, S, hd) cache and handed to it (or to `attend`, a backend's attention), so both
    compute the same arithmetic."""
    S = pos + len(q)
    block_size = k_blocks.shape[2]
    used = np.asarray(block_table[:-(-S // block_size)], np.int64)
    k_cache = _contiguous(k_blocks, used)
    v_cache = _contiguous(v_blocks, used)
    return attend(q, k_cache, v_cache, pos, head_kv)


def _contiguous(blocks, table):
    """(n, KV, B, hd) blocks picked by table -> (KV, n * B, hd) contiguous."""
    picked = blocks[table]                                   # (n, KV, B, hd)
    n, kv, b, hd = picked.shape
    return np.ascontiguousarray(picked.transpose(1, 0, 2, 3)).reshape(kv, n * b, hd)


class PagedStep:
    """The rows of many sequences in one forward, in a BlockPool.

    segments: [(block_table, start, n, logits)] in row order: n rows of one sequence at
    positions start..start+n-1 (its table already holds them); logits None (no logits),
    "last" (its last row) or "all" (every row, as Model.logits computes them).
    merged: multiply all T rows as one block (one dequantization of the weights per
    forward: the most tokens per second where compute binds, but a row's float32 rounding
    then depends on the rows beside it); else each segment as it would be alone
    (RowSegments: batching changes nothing).
    """

    def __init__(self, pool, segments, head_kv, kernels, merged=False):
        self.pool, self.segments, self.head_kv = pool, segments, head_kv
        B = pool.block_size
        self.positions = np.concatenate([np.arange(s, s + n) for _, s, n, _ in segments])
        tables = [np.asarray(t, np.int64) for t, _, _, _ in segments]
        self.slot_blocks = np.concatenate([t[np.arange(s, s + n) // B]
                                           for t, (_, s, n, _) in zip(tables, segments)])
        self.slot_offsets = self.positions % B
        lengths = [n for _, _, n, _ in segments]
        self.kernels = kernels if merged else RowSegments(kernels, lengths)
        rows, head_lengths, start = [], [], 0
        for _, _, n, logits in segments:
            if logits == "all":
                rows.extend(range(start, start + n))
                head_lengths.append(n)
            elif logits == "last":
                rows.append(start + n - 1)
                head_lengths.append(1)
            start += n
        self._logit_rows = np.asarray(rows, np.int64)
        self._head_kernels = kernels if merged else RowSegments(kernels, head_lengths)

    def write(self, layer, k, v):
        """k, v (T, local kv heads, hd): row t into its block and offset."""
        self.pool.k[layer][self.slot_blocks, :, self.slot_offsets] = k
        self.pool.v[layer][self.slot_blocks, :, self.slot_offsets] = v

    def attend(self, layer, q):
        """q (T, local heads, hd) -> (T, local heads * hd): each sequence's rows over its
        own blocks."""
        out, row = [], 0
        for table, start, n, _ in self.segments:
            out.append(paged_attention(q[row:row + n], self.pool.k[layer], self.pool.v[layer],
                                       table, start, self.head_kv, self.kernels.attention))
            row += n
        return np.concatenate(out)

    def logit_rows(self):
        """(rows of x the classifier reads, the kernels that multiply them)."""
        return self._logit_rows, self._head_kernels


class RowSegments:
    """A kernels object (dllm.backend) for a block whose rows come in segments, each
    multiplied as a single-sequence forward of that many rows would be: a segment of one
    row (a decoding step) exactly as T = 1, longer ones (prefill chunks) as their own T-row
    block. So a sequence's numbers do not depend on what else shares the forward. The
    one-row segments are multiplied together (backend.matmul_rows: the weights are read once
    for all of them, which is what batching buys)."""

    def __init__(self, kernels, lengths):
        self.base, self.name, self.attention = kernels, kernels.name, kernels.attention
        # row by row whatever T is: the backend's own
        self.rmsnorm, self.rope, self.swiglu = kernels.rmsnorm, kernels.rope, kernels.swiglu
        starts = np.concatenate([[0], np.cumsum(lengths)]).astype(int)
        self.singles = np.asarray([a for a, n in zip(starts, lengths) if n == 1], np.int64)
        self.blocks = [(a, a + n) for a, n in zip(starts, lengths) if n > 1]
        self.T = int(starts[-1])

    def quantize_input(self, x):
        singles = self.base.quantize_rows(x[self.singles]) if len(self.singles) else None
        return singles, [self.base.quantize_input(x[a:b]) for a, b in self.blocks]

    def input_from_q80(self, payload):
        """Q8_0 bytes (T, nb*34) -> quantize_input of their values."""
        return self.quantize_input(self.base.dequantize_q80(payload))

    def matmul(self, x, w):
        singles, blocks = x
        parts = []
        if singles is not None:
            parts.append((self.singles, self.base.matmul_rows(singles, w)))
        parts += [(slice(a, b), self.base.matmul(xb, w)) for (a, b), xb in zip(self.blocks,
                                                                              blocks)]
        out = np.empty((self.T, parts[0][1].shape[1]), np.float32)
        for rows, y in parts:
            out[rows] = y
        return out


def check_pool(n_blocks, max_seq_len, block_size=BLOCK_SIZE):
    """A pool must hold at least one whole context, or a lone sequence could not finish."""
    need = math.ceil(max_seq_len / block_size)
    if n_blocks < need:
        raise DllmError(f"the KV pool of {n_blocks} blocks of {block_size} positions cannot "
                        f"hold one context of {max_seq_len} tokens ({need} blocks): raise "
                        f"--kv-blocks / --kv-memory or lower --max-seq-len")
