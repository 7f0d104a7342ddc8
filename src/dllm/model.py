"""The tensor-parallel Llama forward pass (Tadych 2024, Distributed Llama; scheme "slices").

One token through the system (the default scheme; "partials" and "reduce" replace the
Allgathers before and after wo and w2 by a sum of row-parallel partial sums, see sum_partials).
T tokens move together as a (T, ...) block, bytes below per
token and layer (n ranks; Q80 carries 32 values in 34 bytes; f32 in 128):

| step                                            | who            | communication                       |
|-------------------------------------------------|----------------|-------------------------------------|
| id -> x (dim)                                   | root           | Bcast x (dim float32)               |
| rmsnorm; local q, k, v rows; RoPE; KV cache     | every rank     | -                                   |
| attention over local heads                      | every rank     | Allgather attention output (dim)    |
| wo slice                                        | every rank     | Allgather (dim); residual add       |
| rmsnorm; w1, w3 slices; SwiGLU                  | every rank     | Allgather hidden (hidden_dim)       |
| w2 slice                                        | every rank     | Allgather (dim); residual add       |
| final norm; classifier slice                    | every rank     | Gather logits to root (vocab f32)   |
| logits -> next id                               | root (sampler) | Bcast id                            |

Scheme "star" (Distributed Llama 0.1, what the paper measured) is a star around root instead:
root alone holds the residual stream, the KV cache and the classifier (Model.star_layer).

Per layer each rank receives (n-1)/n of (dim + dim + hidden_dim + dim) values. Norms and
residual adds are replicated: every rank decodes the same gathered bytes, so the residual
stream is bit-identical on all ranks.

Payload rounding, one rule for every mode and rank count: every activation the table above
exchanges (attention output, wo and w2 outputs, hidden) is rounded to the sync payload
(Q80: quantized and dequantized) on every rank, its own slice included, even on one rank;
pipeline stages (dllm.pipeline) run this same layer loop and round the same activations,
plus the residual stream where it passes from one stage to the next.
"""
from dataclasses import dataclass

import numpy as np

from .backend import make as make_kernels
from .errors import DllmError
from .kernels import rope_tables
from .kvcache import ContiguousStep
from .modelfile import LAYER_MATRICES, NORMS
from .shard import slice_sizes
from .sync import SliceExchange
from .weight_types import Matrix, describe_types, weight_type


@dataclass
class RunState:
    """Buffers allocated once per model: this rank's KV cache (its own kv heads only)."""
    k_cache: np.ndarray  # (layers held, local kv heads, max_seq_len, head_dim) float32
    v_cache: np.ndarray
    residual: np.ndarray = None  # (T, dim) residual stream after the last forward (star: root's)


class Model:
    """A Llama model distributed over the ranks of `comm`; built by ``dllm.load``.

    The one engine of every parallel mode. Tensor mode (this class): every rank holds a
    slice of every layer (shards: dllm.shard's plan) and the layer loop's collectives run
    over all ranks. Pipeline mode (dllm.pipeline.PipelineModel, a subclass): a rank holds
    whole layers [a, b) and runs the same layer loop as a tensor-parallel group of one rank
    (`group`), whose collectives only round each exchanged activation to the sync payload,
    as tensor mode does at every rank count.

    weights: this rank's stored arrays keyed by dataset name ("layers/3/wq", "norm", ...;
    "output" is this rank's classifier rows; "tok_embeddings" exists on root only), each
    matrix as `kernels` (dllm.backend) holds it, already prepared by prepare_weight as it
    was read. types: {dataset name: weight type} of the model file (dllm.weight_types).
    """

    def __init__(self, comm, config, shards, weights, types, sync="q80", max_seq_len=None,
                 prefill_chunk=64, tokenizer=None, path=None, kernels=None, group=None,
                 layer_range=None):
        shard = shards[0 if group is not None else comm.rank]
        self.comm, self.config, self.shard, self.scheme = comm, config, shard, shard.scheme
        self.group = group or comm      # the ranks that share every layer this rank holds
        self.sync, self.prefill_chunk, self.tokenizer, self.path = sync, prefill_chunk, tokenizer, path
        self.max_seq_len = max_seq_len or config.max_seq_len
        self.types, self.quant = types, describe_types(types)
        self.kernels = kernels or make_kernels()
        self.weights = weights
        self.layer_range = layer_range or (0, config.n_layers)
        self.layers = [{name: weights[f"layers/{i}/{name}"] for name in LAYER_MATRICES + NORMS}
                       for i in range(*self.layer_range)]
        codec = self.kernels                  # codes the Q8_0 payload (the same bytes)
        self.exchange_attention = SliceExchange(slice_sizes(shards, "attention"), sync, codec)
        self.exchange_dim = SliceExchange(slice_sizes(shards, "dim"), sync, codec)
        self.exchange_hidden = SliceExchange(slice_sizes(shards, "hidden"), sync, codec)
        # Row-parallel schemes: every rank's full-width partial sum ("partials"), or one chunk
        # of dim per rank for the reduce-scatter ("reduce", the dim slices again).
        self.exchange_partials = SliceExchange([config.dim] * len(shards), sync, codec)
        # Star: root's whole (T, dim) rows to every rank; the ranks' keys or values to root.
        self.exchange_root = SliceExchange([config.dim], sync, codec)
        self.exchange_kv = SliceExchange(slice_sizes(shards, "kv"), sync, codec)
        self.vocab_widths = slice_sizes(shards, "vocab")
        # Query head h reads kv head h // q_per_kv; index it within this rank's cache.
        heads = np.arange(*shard.attention_heads)
        self.head_kv = heads // config.q_per_kv - shard.cache_kv_heads[0]
        self.rope_cos, self.rope_sin = rope_tables(config.head_dim, self.max_seq_len,
                                                   config.rope_theta, **config.rope_scaling_args)
        self.state = RunState(*self.kv_caches())

    def kv_caches(self, sequences=None):
        """Zeroed key and value caches of this rank's layers and kv heads, float32, twice:
        (layers, kv heads, max_seq_len, head_dim), or with a leading axis of `sequences`."""
        c = self.config
        shape = (len(self.layers), self.shard.n_cache_kv_heads, self.max_seq_len, c.head_dim)
        if sequences is not None:
            shape = (sequences,) + shape
        return np.zeros(shape, np.float32), np.zeros(shape, np.float32)

    # --- the forward pass ---------------------------------------------------------------
    def forward(self, tokens, pos, logits="last", step=None):
        """Run tokens (T,) at positions pos..pos+T-1 through the model, filling the KV cache.

        Every rank calls with the same tokens. logits: "last" (1, vocab), "all" (T, vocab) or
        None; returned on root (float32), None on other ranks and when logits is None.
        step: where the rows' keys and values live (dllm.kvcache); None is this model's
        contiguous cache of one sequence. A kvcache.PagedStep carries rows of many sequences
        at their own positions (pos unused); its logits are the rows it names.
        """
        if step is None:
            self.check_span(pos, len(tokens))
        c, comm = self.config, self.comm
        x = np.empty((len(tokens), c.dim), dtype=np.float32)         # residual stream
        if comm.is_root:
            x[:] = self.embed(tokens)
        if self.scheme != "star":     # star: the residual stream lives on root alone
            comm.bcast_array(x)                                      # Bcast x
        x = self.run_layers(x, pos, self.state.k_cache, self.state.v_cache, step)
        self.state.residual = x
        if logits is None:
            return None
        if step is None:
            return self.classify(x if logits == "all" else x[-1:])   # Gather -> root
        rows, kernels = step.logit_rows()
        return self.classify(x[rows], kernels)                       # Gather -> root

    def run_layers(self, x, pos, k_caches, v_caches, step=None):
        """The layer loop: x (T, dim) float32 at positions pos..pos+T-1 through this rank's
        layers, filling their KV caches k_caches[i], v_caches[i] (local kv heads, max_seq_len,
        head_dim); returns the new residual stream (T, dim). Collective over `group`.
        step: a kvcache step that says instead where each row's keys and values go."""
        c, shard, group, eps = self.config, self.shard, self.group, self.config.norm_eps
        T, hd = len(x), c.head_dim
        if step is None:
            step = ContiguousStep(k_caches, v_caches, pos, T, self.head_kv, self.kernels)
        kernels, mm = step.kernels, step.kernels.matmul
        cos, sin = self.rope_cos[step.positions], self.rope_sin[step.positions]
        for layer, w in enumerate(self.layers):
            if shard.scheme == "star":     # the paper's design: every exchange through root
                x = self.star_layer(x, w, layer, step, cos, sin)
                continue
            # attention block: this rank's query heads and the kv heads they read
            xb = kernels.quantize_input(kernels.rmsnorm(x, w["attention_norm"], eps))
            q = kernels.rope(mm(xb, w["wq"]).reshape(T, shard.n_heads, hd), cos, sin)
            k = kernels.rope(mm(xb, w["wk"]).reshape(T, shard.n_kv_heads, hd), cos, sin)
            v = mm(xb, w["wv"]).reshape(T, shard.n_kv_heads, hd)
            step.write(layer, k, v)                                    # into the KV cache
            att = step.attend(layer, q)                                # (T, local heads * hd)
            if not shard.row_parallel:     # "slices"
                att = group.allgather_slices(att, self.exchange_attention,
                                             as_input=kernels)       # Allgather -> (T, dim)
                o = mm(att, w["wo"])                                        # (T, local dim rows)
                x = x + group.allgather_slices(o, self.exchange_dim)        # Allgather; residual
            else:  # wo row-parallel: this rank's heads are its input columns
                o = mm(kernels.quantize_input(att), w["wo"])                # (T, dim) partial
                x = x + self.sum_partials(o)                                # (T, dim); residual

            # feed-forward block: this rank's hidden units
            xb = kernels.quantize_input(kernels.rmsnorm(x, w["ffn_norm"], eps))
            h = kernels.swiglu(mm(xb, w["w1"]), mm(xb, w["w3"]))        # (T, local hidden)
            if not shard.row_parallel:     # "slices"
                h = group.allgather_slices(h, self.exchange_hidden,
                                           as_input=kernels)         # Allgather -> (T, hidden)
                f = mm(h, w["w2"])                                      # (T, local dim rows)
                x = x + group.allgather_slices(f, self.exchange_dim)    # Allgather; residual
            else:  # w2 row-parallel: this rank's hidden units are its input columns
                f = mm(kernels.quantize_input(h), w["w2"])              # (T, dim) partial
                x = x + self.sum_partials(f)                            # (T, dim); residual
        return x

    def star_layer(self, x, w, layer, step, cos, sin):
        """One layer of scheme "star" (Distributed Llama 0.1, Tadych 2024): x (T, dim), the
        residual stream, is root's alone (other ranks pass and get back an unused array of
        that shape); root holds the whole KV cache and attends over every head, every rank
        multiplies its rows of every matrix. Per token root sends every other rank its
        normalized x twice and the attention output (3 dim values) and the hidden slices
        of the other ranks; each rank sends root its q, k, v, wo, hidden and w2 slices
        (docs/sync.md). Collective over `group`; w: the layer's weights."""
        c, shard, group, eps = self.config, self.shard, self.group, self.config.norm_eps
        T, hd, root = len(x), c.head_dim, self.group.is_root
        kernels, mm = step.kernels, step.kernels.matmul
        # attention block: root's normalized x out, every rank's q, k, v rows in
        xn = kernels.rmsnorm(x, w["attention_norm"], eps) if root else None
        xb = kernels.quantize_input(group.bcast_rows(xn, self.exchange_root, T))  # root ->
        q = kernels.rope(mm(xb, w["wq"]).reshape(T, shard.n_heads, hd), cos, sin)
        k = kernels.rope(mm(xb, w["wk"]).reshape(T, shard.n_kv_heads, hd), cos, sin)
        q = group.gather_slices(q.reshape(T, -1), self.exchange_attention)   # Gatherv -> root
        k = group.gather_slices(k.reshape(T, -1), self.exchange_kv)          # Gatherv -> root
        v = group.gather_slices(mm(xb, w["wv"]), self.exchange_kv)           # Gatherv -> root
        att = None
        if root:    # the whole KV cache and every head's attention
            step.write(layer, k.reshape(T, c.n_kv_heads, hd), v.reshape(T, c.n_kv_heads, hd))
            att = step.attend(layer, q.reshape(T, c.n_heads, hd))           # (T, dim)
        att = group.bcast_rows(att, self.exchange_root, T)                   # root -> (T, dim)
        o = mm(kernels.quantize_input(att), w["wo"])                         # (T, local dim rows)
        o = group.gather_slices(o, self.exchange_dim)                        # Gatherv -> root
        x = x + o if root else x                                             # residual

        # feed-forward block: root's normalized x out, the hidden slices relayed by root
        xn = kernels.rmsnorm(x, w["ffn_norm"], eps) if root else None
        xb = kernels.quantize_input(group.bcast_rows(xn, self.exchange_root, T))  # root ->
        h = kernels.swiglu(mm(xb, w["w1"]), mm(xb, w["w3"]))                 # (T, local hidden)
        h = group.allgather_through_root(h, self.exchange_hidden)  # -> root -> (T, hidden)
        f = mm(kernels.quantize_input(h), w["w2"])                           # (T, local dim rows)
        f = group.gather_slices(f, self.exchange_dim)                        # Gatherv -> root
        return x + f if root else x                                          # residual

    def classify(self, x, kernels=None):
        """Final norm and this rank's classifier rows of x (R, dim); the ranks' logits
        gathered to root -> (R, vocab) float32 on root, None elsewhere. Collective.
        kernels: those that multiply x's rows (a kvcache step's), default the model's.
        Scheme "star": root alone holds the whole classifier; no Gather."""
        kernels = kernels or self.kernels
        if self.scheme == "star" and not self.group.is_root:
            return None
        final = kernels.rmsnorm(x, self.weights["norm"], self.config.norm_eps)
        local_logits = kernels.matmul(kernels.quantize_input(final),
                                      self.weights["output"])            # (R, local vocab)
        if self.scheme == "star":
            return local_logits                                          # (R, vocab)
        return self.group.gather_rows(local_logits, self.vocab_widths)   # Gather -> root

    def sum_partials(self, partial):
        """Add up every rank's (T, dim) partial sum; the same bytes on every rank.

        "partials": Allgather all partial sums (Q80) and add them in rank order.
        "reduce": Alltoall sends chunk c of every partial sum to rank c, which adds them
        (reduce-scatter), then Allgather of the summed chunks: a ring all-reduce's bytes.
        """
        group = self.group
        if self.shard.scheme == "partials":
            gathered = group.allgather_slices(partial, self.exchange_partials)  # (T, n*dim)
            return gathered.reshape(len(partial), group.size, -1).sum(axis=1)
        mine = group.alltoall_chunks(partial, self.exchange_dim)               # (n, T, chunk)
        return group.allgather_slices(mine.sum(axis=0), self.exchange_dim)     # (T, dim)

    def embed(self, tokens):
        """Root only: rows of the token embedding, (T, dim) float32."""
        return self.weights["tok_embeddings"].rows(np.asarray(tokens, dtype=np.int64))

    def check_span(self, pos, T):
        if pos + T > self.max_seq_len:
            raise DllmError(f"sequence of {pos + T} tokens exceeds the context of "
                            f"{self.max_seq_len}")

    # --- prefill ------------------------------------------------------------------------
    def prefill(self, ids, pos=0, logits="last"):
        """The prefill loop: ids at positions pos.. in blocks of prefill_chunk tokens (the
        matrix-matrix kernels), one after another. logits: "last" -> (1, vocab) of the last
        id, "all" -> (len(ids), vocab), None; on root, None elsewhere. Collective."""
        outputs = []
        for start in range(0, len(ids), self.prefill_chunk):
            chunk = ids[start:start + self.prefill_chunk]
            last = start + len(chunk) == len(ids)
            out = self.forward(chunk, pos + start, logits if logits == "all" or last else None)
            if out is not None:
                outputs.append(out)
        return np.concatenate(outputs) if outputs else None

    # --- library API --------------------------------------------------------------------
    def _bcast_ids(self, token_ids):
        ids = self.comm.bcast(None if token_ids is None or not self.comm.is_root
                              else [int(t) for t in token_ids])
        return check_prompt(ids, self.config.vocab_size, self.max_seq_len)

    def logits(self, token_ids):
        """Float32 logits (T, vocab) for every position of token_ids, on root; None elsewhere.

        Collective: every rank calls it; root's token_ids are used. Starts from position 0.
        """
        return self.prefill(self._bcast_ids(token_ids), 0, "all")

    def generate(self, prompt_ids, steps, sampler, stop_at_eos=True):
        """Yield new token ids (on every rank), at most `steps` of them or until the context
        is full; stops after EOS when stop_at_eos. Collective: every rank iterates it."""
        return generate_tokens(self, self._bcast_ids(prompt_ids), [], steps, sampler,
                               stop_at_eos)


def prepare_weight(kernels, key, array, wtype):
    """What a rank keeps of a stored array of weight type `wtype`, read as dataset `key`:
    the layers' matrices and the classifier ("output") as `kernels` multiplies them, the
    embedding table (read by rows) a weight_types.Matrix, the norms float32 as stored."""
    leaf = key.rsplit("/", 1)[-1]
    if key == "output" or leaf in LAYER_MATRICES:
        return kernels.prepare(array, wtype)
    if key == "tok_embeddings":
        return Matrix(array, weight_type(wtype))
    return array


def check_prompt(ids, vocab_size, max_seq_len):
    """Raise DllmError unless ids (a list of ints, the same on every rank) is a non-empty
    prompt of this vocabulary that fits the context; returns ids."""
    if not ids:
        raise DllmError("no tokens given")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise DllmError(f"token id {bad[0]} is outside the vocabulary of {vocab_size}")
    if len(ids) > max_seq_len:
        raise DllmError(f"prompt of {len(ids)} tokens does not fit the context of "
                        f"{max_seq_len} tokens (see --max-seq-len)")
    return ids


def generate_tokens(model, prompt_ids, done, steps, sampler, stop_at_eos=True):
    """The decoding loop of any model (tensor-parallel or pipeline), resumable.

    prompt_ids and done (the tokens an earlier, interrupted run already generated from this
    prompt, in order; [] for a new run) are lists of ids on every rank. The prompt is
    prefilled in prefill_chunk blocks and each of `done` is replayed as its own decoding
    step: the very computations of the uninterrupted run, so that its KV cache and logits
    are rebuilt bit for bit. Then yields the new ids (on every rank; root samples, Bcast id)
    until `steps` in all, the full context, or EOS when stop_at_eos. Collective.
    """
    steps = min(steps, model.max_seq_len - len(prompt_ids) + 1)
    if len(prompt_ids) + len(done) > model.max_seq_len:
        so_far = f" and {len(done)} generated" if done else ""
        raise DllmError(f"prompt of {len(prompt_ids)}{so_far} tokens does not fit the context "
                        f"of {model.max_seq_len} tokens (see --max-seq-len)")
    if len(done) >= steps or (stop_at_eos and done and done[-1] == model.config.eos_id):
        return
    logits = model.prefill(prompt_ids, 0, "last")
    pos = len(prompt_ids)
    for token in done:
        logits = model.forward([token], pos)
        pos += 1
    token_buffer = np.zeros(1, dtype=np.int64)
    for produced in range(len(done) + 1, steps + 1):
        if model.comm.is_root:
            token_buffer[0] = sampler.sample(logits[-1])
        token = int(model.comm.bcast_array(token_buffer)[0])             # Bcast id
        yield token
        if produced == steps or (stop_at_eos and token == model.config.eos_id):
            return
        logits = model.forward([token], pos)
        pos += 1
