"""The sharding plan: which rows of every weight matrix each rank owns.

A pure function of (config, world size); tests loop over ranks in one process.

| weight            | split (scheme "slices")                  | rank r holds                         |
|-------------------|------------------------------------------|--------------------------------------|
| wq                | by query head                            | rows of heads [h0, h1)               |
| wk, wv            | by the kv heads its query heads read     | rows of kv heads [k0, k1) (may repeat on ranks that share a kv head) |
| wo, w2            | by output rows (dim), in 32-row blocks    | rows [d0, d1)                        |
| w1, w3            | by hidden units, in 32-unit blocks        | rows [f0, f1)                        |
| output (classifier)| by vocabulary rows                       | rows [v0, v1)                        |
| norms             | replicated                               | all                                  |
| tok_embeddings    | root only                                | all                                  |

Schemes "partials" and "reduce" split wo and w2 by *input* instead (row-parallel, as Megatron
and Distributed Llama do): a rank holds all rows of wo for the columns of its own attention
heads, and all rows of w2 for the columns of its own hidden units, so it needs no Allgather
before those matmuls; it produces a full-width partial sum that the ranks then add up.

Scheme "star" is Distributed Llama 0.1's design (Tadych 2024, the paper's measurements): the
matrices split as in "slices", but wk and wv by kv heads (each kv head on one rank only: a rank
may hold none), and root alone holds the classifier, attends over every head and keeps the
whole KV cache; the other ranks hold no cache (dllm.model.Model.star_layer).

Every split is a contiguous range of rows, so a rank reads its slice of a matrix with one
contiguous HDF5 hyperslab. Splits of dim and hidden follow 32-value blocks so that each rank's
Q80 payload is whole blocks whenever the sizes allow; when the blocks (or heads) do not
divide evenly the first ranks get one more (uneven splits are exchanged with Allgatherv). More ranks than kv heads work: ranks whose
query heads share a kv head each compute their own copy of that head's keys and values
(as vLLM does), which costs memory and compute but no communication.
"""
from dataclasses import dataclass

from .errors import DllmError

BLOCK = 32  # values per Q80 block: the unit in which dim and hidden are split


def block_split(n_units, size):
    """Split range(n_units) into `size` contiguous (start, stop) ranges; earlier ranges get
    the extra units (the mpi4py-fft block distribution)."""
    base, extra = divmod(n_units, size)
    bounds = [r * base + min(r, extra) for r in range(size + 1)]
    return [(bounds[r], bounds[r + 1]) for r in range(size)]


def blocked_rows(n_rows, size, unit=BLOCK):
    """Split n_rows into `size` ranges made of whole `unit`-row blocks (the last block may be
    short when n_rows is not a multiple of unit)."""
    n_blocks = -(-n_rows // unit)
    return [(min(a * unit, n_rows), min(b * unit, n_rows)) for a, b in block_split(n_blocks, size)]


def proportional_counts(total, weights, caps=None, minimum=0):
    """Integers n_i summing to `total`, each in [minimum, caps[i]], as close to
    total * w_i / sum(w) as those bounds allow (largest remainder; ties to lower indices).

    Water-filling: a rank whose proportional share exceeds its cap gets the cap and the rest
    is shared again among the others. Zero weights get only the minimum unless nothing else
    can hold the units. Raises DllmError when the caps cannot hold `total`.
    """
    n = len(weights)
    w = [float(x) for x in weights]
    caps = [int(total)] * n if caps is None else [int(c) for c in caps]
    if n == 0 or len(caps) != n or any(not x >= 0 for x in w) or any(c < 0 for c in caps):
        raise DllmError(f"shares must be one non-negative number per rank, got {list(weights)}")
    if sum(caps) < total:
        raise DllmError(f"{total} units do not fit: the ranks hold at most {sum(caps)}")
    low = [min(minimum, c) for c in caps]
    if sum(low) > total:
        low = [0] * n
    share = _water_fill(total, w, low, caps)
    counts = [min(max(int(x), lo), c) for x, lo, c in zip(share, low, caps)]
    order = sorted(range(n), key=lambda i: (-(share[i] - int(share[i])), i))
    while sum(counts) < total:   # hand out the remainder, largest fraction first
        i = next(i for i in order if counts[i] < caps[i])
        counts[i] += 1
        order.remove(i)
        order.append(i)
    while sum(counts) > total:   # rounding up to the minimums overshot: take from the largest
        i = max(range(n), key=lambda i: (counts[i] - low[i], -i))
        counts[i] -= 1
    return counts


def _water_fill(total, w, low, caps):
    """Real shares x_i = clip(t * w_i, low_i, caps_i) summing to total; when only zero
    weights are left to hold units, they fill up in rank order."""
    n, fixed = len(w), {}
    while True:
        free = [i for i in range(n) if i not in fixed]
        left = total - sum(fixed.values())
        weight = sum(w[i] for i in free)
        if weight == 0:
            for i in free:
                fixed[i] = min(caps[i], max(low[i], left - sum(low[j] for j in free if j > i)))
                left -= fixed[i]
            return [fixed[i] for i in range(n)]
        x = {i: left * w[i] / weight for i in free}
        over = [i for i in free if x[i] > caps[i]]
        under = [i for i in free if x[i] < low[i]]
        if not over and not under:
            return [fixed[i] if i in fixed else x[i] for i in range(n)]
        for i in over or under:
            fixed[i] = caps[i] if over else low[i]


def counts_to_ranges(counts):
    """[2, 0, 3] -> [(0, 2), (2, 2), (2, 5)]: contiguous ranges of those sizes."""
    bounds = [0]
    for c in counts:
        bounds.append(bounds[-1] + c)
    return [(bounds[r], bounds[r + 1]) for r in range(len(counts))]


def shared_rows(n_rows, shares, unit=BLOCK):
    """Like blocked_rows, but whole `unit`-row blocks in proportion to `shares`; every rank
    gets at least one block while there are as many blocks as ranks."""
    n_blocks = -(-n_rows // unit)
    counts = proportional_counts(n_blocks, shares, minimum=1 if n_blocks >= len(shares) else 0)
    return [(min(a * unit, n_rows), min(b * unit, n_rows)) for a, b in counts_to_ranges(counts)]


@dataclass(frozen=True)
class RankShard:
    """The rows one rank owns. Ranges are half-open (start, stop)."""
    rank: int
    size: int
    heads: tuple        # query heads
    kv_heads: tuple     # kv heads of its wk, wv rows: read by its query heads (star: its share)
    dim_rows: tuple     # rows of wo and w2
    hidden_rows: tuple  # rows of w1 and w3
    vocab_rows: tuple   # rows of the classifier
    head_dim: int
    scheme: str = "slices"
    attends: tuple = None   # query heads this rank attends over (None: heads; star: root all)
    caches: tuple = None    # kv heads whose keys and values it caches (None: kv_heads)

    @property
    def attention_heads(self):
        return self.heads if self.attends is None else self.attends

    @property
    def cache_kv_heads(self):
        return self.kv_heads if self.caches is None else self.caches

    @property
    def n_cache_kv_heads(self):
        """kv heads in this rank's KV cache (star: all on root, none elsewhere)."""
        return self.cache_kv_heads[1] - self.cache_kv_heads[0]

    @property
    def q_rows(self):
        """Rows of wq, also this rank's columns of the attention output."""
        return (self.heads[0] * self.head_dim, self.heads[1] * self.head_dim)

    @property
    def kv_rows(self):
        return (self.kv_heads[0] * self.head_dim, self.kv_heads[1] * self.head_dim)

    @property
    def n_heads(self):
        return self.heads[1] - self.heads[0]

    @property
    def n_kv_heads(self):
        return self.kv_heads[1] - self.kv_heads[0]

    @property
    def row_parallel(self):
        """wo and w2 split by input columns (schemes "partials" and "reduce")."""
        return self.scheme in ("partials", "reduce")

    def rows(self, name):
        """Row range of the named weight (Llama vocabulary) held by this rank; None = all."""
        if self.row_parallel and name in ("wo", "w2"):
            return None
        return {"wq": self.q_rows, "wk": self.kv_rows, "wv": self.kv_rows,
                "wo": self.dim_rows, "w2": self.dim_rows,
                "w1": self.hidden_rows, "w3": self.hidden_rows,
                "output": self.vocab_rows}[name]

    def cols(self, name):
        """Column range held by this rank; None = all columns."""
        if self.row_parallel and name in ("wo", "w2"):
            return self.q_rows if name == "wo" else self.hidden_rows
        return None


def check_world_size(config, size):
    """Raise DllmError, naming the numbers, when `size` ranks cannot split the model."""
    if size < 1:
        raise DllmError(f"world size must be at least 1, got {size}")
    if size > config.n_heads:
        raise DllmError(
            f"cannot split {config.n_heads} query heads over {size} ranks: "
            f"this model runs on at most {config.n_heads} ranks")


SCHEMES = ("slices", "partials", "reduce", "star")


def plan(config, size, scheme="slices", shares=None):
    """The shard of every rank, a list indexed by rank.

    shares: None (even split) or one positive number per rank, e.g. relative speeds from a
    device profile (dllm.profile): heads, dim and hidden blocks and vocabulary rows are then
    split in proportion to them, every rank keeping at least one head and one block."""
    if scheme not in SCHEMES:
        raise DllmError(f"--sync-scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    check_world_size(config, size)
    if shares is None:
        splits = (block_split(config.n_heads, size), blocked_rows(config.dim, size),
                  blocked_rows(config.hidden_dim, size), block_split(config.vocab_size, size))
    else:
        if len(shares) != size or not all(s > 0 for s in shares):
            raise DllmError(f"uneven slices need one positive share per rank ({size} ranks), "
                            f"got {list(shares)}")
        splits = (counts_to_ranges(proportional_counts(config.n_heads, shares, minimum=1)),
                  shared_rows(config.dim, shares), shared_rows(config.hidden_dim, shares),
                  counts_to_ranges(proportional_counts(config.vocab_size, shares, minimum=1)))
    if scheme == "star":
        return star_plan(config, size, shares, *splits[:3])
    g = config.q_per_kv
    shards = []
    for rank, ((h0, h1), dim_rows, hidden_rows, vocab_rows) in enumerate(zip(*splits)):
        kv_heads = (h0 // g, (h1 - 1) // g + 1)
        shards.append(RankShard(rank, size, (h0, h1), kv_heads, dim_rows, hidden_rows,
                                vocab_rows, config.head_dim, scheme))
    return shards


def star_plan(config, size, shares, heads, dim_rows, hidden_rows):
    """Scheme "star": the splits of "slices" for wq, wo, w1, w3, w2; wk and wv by kv heads
    (each once; with more ranks than kv heads the last ranks hold none); root attends over
    every query head, caches every kv head and holds the whole classifier."""
    n_kv, vocab = config.n_kv_heads, config.vocab_size
    kv_heads = (block_split(n_kv, size) if shares is None
                else counts_to_ranges(proportional_counts(n_kv, shares)))
    return [RankShard(rank, size, heads[rank], kv_heads[rank], dim_rows[rank],
                      hidden_rows[rank], (0, vocab) if rank == 0 else (vocab, vocab),
                      config.head_dim, "star",
                      attends=(0, config.n_heads) if rank == 0 else (0, 0),
                      caches=(0, n_kv) if rank == 0 else (0, 0))
            for rank in range(size)]


def shard_for(config, rank, size, scheme="slices"):
    """This rank's shard: the pure function of (config, rank, size)."""
    return plan(config, size, scheme)[rank]


def slice_sizes(shards, name):
    """Per-rank widths of the slice each rank contributes to the Allgather after `name`:
    'attention' (attention output), 'dim' (wo/w2 outputs), 'hidden' (SwiGLU output), 'kv'
    (keys or values: scheme star's Gather to root), 'vocab' (logits)."""
    pick = {"attention": lambda s: s.q_rows, "dim": lambda s: s.dim_rows,
            "kv": lambda s: s.kv_rows,
            "hidden": lambda s: s.hidden_rows, "vocab": lambda s: s.vocab_rows}[name]
    return [pick(s)[1] - pick(s)[0] for s in shards]
