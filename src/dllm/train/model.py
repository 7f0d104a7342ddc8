"""The training forward and backward of a Llama over the ranks of a tensor group.

Weights split as the inference's row-parallel scheme ("partials", dllm.shard): wq, wk, wv,
w1, w3 by output rows (this rank's heads and hidden units), wo and w2 by input columns (the
same heads and units), the classifier by vocabulary rows; norms and the embedding replicated.
Each forward collective has its conjugate in the backward (Megatron's f and g):

| forward                                   | backward                                        |
|-------------------------------------------|-------------------------------------------------|
| x replicated into q, k, v / w1, w3 (copy) | Allreduce of the partial input gradients        |
| Allreduce of wo / w2 partial sums         | the replicated gradient taken as it is (copy)   |
| Allgather of the classifier's vocab slices| each rank takes its own vocab columns (slice)   |

On a tensor group of one rank (COMM_SELF, or data parallel) every collective is an identity
and this is the plain single-process forward and backward. Bytes per token and layer: two
(dim) float32 Allreduces forward, two backward.
"""
import math
from dataclasses import dataclass

import numpy as np

from ..errors import DllmError
from ..kernels import rope_frequencies, rope_tables
from ..modelfile import LAYER_MATRICES, NORMS, layer_name, tensor_shapes
from ..shard import plan
from ..sync import SliceExchange
from . import ops


@dataclass(frozen=True)
class TensorSplit:
    """Which part of every weight this rank of a tensor group of `size` ranks holds."""
    config: object
    shards: list       # dllm.shard RankShard per rank, scheme "partials"
    rank: int

    @property
    def shard(self):
        return self.shards[self.rank]

    @property
    def size(self):
        return len(self.shards)

    @property
    def split_vocab(self):
        """A tied classifier is the embedding, replicated: its logits are computed whole."""
        return self.size > 1 and not self.config.tie_embeddings

    def axis(self, name):
        """(axis, (start, stop)) of the part of tensor `name` this rank holds; None: all."""
        return self.axis_of(self.shard, name)

    def axis_of(self, shard, name):
        base = name.rsplit("/", 1)[-1]
        if self.size == 1 or base in NORMS or base in ("norm", "tok_embeddings"):
            return None
        if base == "output":
            return (0, shard.vocab_rows) if self.split_vocab else None
        rows, cols = shard.rows(base), shard.cols(base)
        return (0, rows) if rows is not None else (1, cols)

    def local(self, name, full):
        """This rank's part of the full tensor `name` (a copy)."""
        where = self.axis(name)
        if where is None:
            return np.array(full)
        axis, (a, b) = where
        return np.array(full[a:b] if axis == 0 else full[:, a:b])

    def widths(self, name):
        """Per-rank extents of `name` along its split axis (None when replicated)."""
        if self.axis(name) is None:
            return None
        return [b - a for _, (a, b) in (self.axis_of(s, name) for s in self.shards)]


def tensor_split(config, comm):
    """The TensorSplit of this rank; DllmError when `comm.size` ranks cannot split the model
    for training (a kv head shared by two ranks would need its gradients summed)."""
    if comm.size > 1 and config.n_kv_heads % comm.size:
        raise DllmError(f"--parallel tensor: {config.n_kv_heads} kv heads cannot be split "
                        f"over {comm.size} ranks for training (each rank needs whole kv heads)")
    return TensorSplit(config, plan(config, comm.size, "partials"), comm.rank)


def grad_order(config):
    """Tensor names in the order the backward finishes their gradients: classifier and final
    norm first, then the layers from the last, the embedding last (the buckets' order)."""
    names = ["norm"] + ([] if config.tie_embeddings else ["output"])
    for layer in reversed(range(config.n_layers)):
        names += [layer_name(layer, n) for n in ("w2", "w1", "w3", "ffn_norm", "wo", "wq",
                                                    "wk", "wv", "attention_norm")]
    return names + ["tok_embeddings"]


def local_shapes(split):
    """Shape of this rank's part of every tensor, keyed by name."""
    shapes = {}
    for name, shape in tensor_shapes(split.config).items():
        where = split.axis(name)
        if where is not None:
            axis, (a, b) = where
            shape = tuple(b - a if i == axis else s for i, s in enumerate(shape))
        shapes[name] = shape
    return shapes


def rope_for(config, T, dtype):
    """cos, sin (T, head_dim/2): the inference's float32 tables, or float64 ones."""
    if dtype == np.float32:
        return rope_tables(config.head_dim, T, config.rope_theta, **config.rope_scaling_args)
    angles = np.outer(np.arange(T), rope_frequencies(config.head_dim, config.rope_theta,
                                                     **config.rope_scaling_args))
    return np.cos(angles), np.sin(angles)


def loss_and_grads(params, split, tokens, comm, d_loss, on_ready=None, grads=True):
    """Summed next-token loss of a batch and the gradients of d_loss times it.

    params: this rank's parts of every tensor (float32 for training, float64 for checks);
    tokens (B, T+1) int, the same on every rank of the tensor group `comm`; d_loss: the
    weight of the summed loss (1 / tokens of the global batch, for the mean). Returns
    (loss sum as a float, {name: gradient} or None when grads is False). on_ready(names,
    grads) is called as soon as the named gradients are final (grad_order), so that a data-
    parallel sync can start on them while the backward goes on. Collective over `comm`.
    """
    c, eps = split.config, split.config.norm_eps
    B, T = tokens.shape[0], tokens.shape[1] - 1
    N, hd, shard = B * T, c.head_dim, split.shard
    n_heads, n_kv = shard.n_heads, shard.n_kv_heads
    cos, sin = rope_for(c, T, params["norm"].dtype)
    ids, targets = tokens[:, :-1].reshape(-1), tokens[:, 1:].reshape(-1)

    # --- forward: every op keeps what its backward needs ---
    x, _ = ops.embedding_forward(params["tok_embeddings"], ids)        # (N, dim)
    saved = []
    for layer in range(c.n_layers):
        w = {n: params[layer_name(layer, n)] for n in LAYER_MATRICES + NORMS}
        s = {}
        h, s["attention_norm"] = ops.rmsnorm_forward(x, w["attention_norm"], eps)
        q, s["wq"] = ops.matmul_forward(h, w["wq"])
        k, s["wk"] = ops.matmul_forward(h, w["wk"])
        v, s["wv"] = ops.matmul_forward(h, w["wv"])
        q, _ = ops.rope_forward(q.reshape(B, T, n_heads, hd), cos, sin)
        k, _ = ops.rope_forward(k.reshape(B, T, n_kv, hd), cos, sin)
        att, s["attention"] = ops.attention_forward(q, k, v.reshape(B, T, n_kv, hd))
        o, s["wo"] = ops.matmul_forward(att.reshape(N, -1), w["wo"])   # (N, dim) partial
        x = x + comm.allreduce_sum(o)                                  # Allreduce; residual
        h, s["ffn_norm"] = ops.rmsnorm_forward(x, w["ffn_norm"], eps)
        gate, s["w1"] = ops.matmul_forward(h, w["w1"])
        up, s["w3"] = ops.matmul_forward(h, w["w3"])
        hidden, s["swiglu"] = ops.swiglu_forward(gate, up)             # (N, local hidden)
        f, s["w2"] = ops.matmul_forward(hidden, w["w2"])               # (N, dim) partial
        x = x + comm.allreduce_sum(f)                                  # Allreduce; residual
        saved.append(s)
    xn, s_norm = ops.rmsnorm_forward(x, params["norm"], eps)
    classifier = params["tok_embeddings" if c.tie_embeddings else "output"]
    logits, s_out = ops.matmul_forward(xn, classifier)                 # (N, local vocab)
    if split.split_vocab:
        exchange = SliceExchange(split.widths("output"), "f32")
        logits = comm.allgather_slices(logits, exchange)               # Allgather -> (N, vocab)
    loss, s_loss = ops.cross_entropy_forward(logits, targets)
    if not grads:
        return loss, None

    # --- backward: the ops in reverse, each forward collective's conjugate ---
    g = {}
    d_logits = ops.cross_entropy_backward(d_loss, s_loss)              # (N, vocab) replicated
    if split.split_vocab:
        v0, v1 = shard.vocab_rows
        d_logits = d_logits[:, v0:v1]                                  # slice: own columns
    d_xn, d_classifier = ops.matmul_backward(d_logits, s_out)
    if split.split_vocab:
        d_xn = comm.allreduce_sum(d_xn)                                # Allreduce partials
    dx, g["norm"] = ops.rmsnorm_backward(d_xn, s_norm)
    if not c.tie_embeddings:
        g["output"] = d_classifier
    _ready(on_ready, g, ["norm"] + ([] if c.tie_embeddings else ["output"]))
    for layer in reversed(range(c.n_layers)):
        s, gl = saved[layer], {}
        d_hidden, gl["w2"] = ops.matmul_backward(dx, s["w2"])          # dx: copy's conjugate
        d_gate, d_up = ops.swiglu_backward(d_hidden, s["swiglu"])
        dh1, gl["w1"] = ops.matmul_backward(d_gate, s["w1"])
        dh3, gl["w3"] = ops.matmul_backward(d_up, s["w3"])
        dh = comm.allreduce_sum(dh1 + dh3)                             # Allreduce partials
        dx_ffn, gl["ffn_norm"] = ops.rmsnorm_backward(dh, s["ffn_norm"])
        dx = dx + dx_ffn
        d_att, gl["wo"] = ops.matmul_backward(dx, s["wo"])
        dq, dk, dv = ops.attention_backward(d_att.reshape(B, T, -1), s["attention"])
        dq = ops.rope_backward(dq, (cos, sin)).reshape(N, -1)
        dk = ops.rope_backward(dk, (cos, sin)).reshape(N, -1)
        dhq, gl["wq"] = ops.matmul_backward(dq, s["wq"])
        dhk, gl["wk"] = ops.matmul_backward(dk, s["wk"])
        dhv, gl["wv"] = ops.matmul_backward(dv.reshape(N, -1), s["wv"])
        dh = comm.allreduce_sum(dhq + dhk + dhv)                       # Allreduce partials
        dx_att, gl["attention_norm"] = ops.rmsnorm_backward(dh, s["attention_norm"])
        dx = dx + dx_att
        names = [layer_name(layer, n) for n in gl]
        g.update(zip(names, gl.values()))
        _ready(on_ready, g, names)
    g["tok_embeddings"] = ops.embedding_backward(dx, ids, c.vocab_size)
    if c.tie_embeddings:
        g["tok_embeddings"] += d_classifier
    _ready(on_ready, g, ["tok_embeddings"])
    return loss, g


def _ready(on_ready, grads, names):
    if on_ready is not None:
        on_ready(names, grads)


def init_params(config, rng):
    """Full float32 weights of a model trained from scratch: matrices N(0, 0.02), the
    residual projections wo and w2 scaled by 1/sqrt(2 layers) (GPT-2), norms 1."""
    params = {}
    for name, shape in tensor_shapes(config).items():
        if len(shape) == 1:
            params[name] = np.ones(shape, np.float32)
            continue
        std = 0.02 / (math.sqrt(2 * config.n_layers) if name.endswith(("wo", "w2")) else 1)
        params[name] = (std * rng.standard_normal(shape)).astype(np.float32)
    return params


def parameter_count(config):
    return sum(math.prod(s) for s in tensor_shapes(config).values())

