"""What every rank holds: the tensors it reads and the bytes they and its KV cache take.

Pure functions of (config, weight types, world size, split), used by loading (what to read),
the memory checks, dllm.inspect and the planner, so that all four count the same bytes:

- tensor mode: every rank a slice of every matrix (dllm.shard's split table), root also the
  token embedding (``tensor_entries``, ``shard_bytes``);
- pipeline mode: every rank whole layers [a, b), root also the embedding, the final norm and
  the classifier (``stage_entries``, ``stage_bytes``; ``split_layers`` is the even split,
  dllm.profile the split by speed and memory).

`types` says each tensor's weight type (dllm.weight_types): a dict {dataset name: type}, as
ModelFile.types() reads it from the file, or one type name for every matrix (synthetic
shapes, the planner's what-ifs). Norm vectors are always f32. Bytes are the stored bytes
(0.5625 per Q4_0 weight, ...), the KV cache float32 keys and values.
"""
from .modelfile import LAYER_MATRICES, NORMS, tensor_shapes
from .shard import block_split
from .weight_types import TYPES


def type_of(types, dataset):
    """The weight type of dataset `dataset`: "f32" for norms, else from `types` (a dict or
    one name)."""
    if dataset == "norm" or dataset.rsplit("/", 1)[-1] in NORMS:
        return "f32"
    return types if isinstance(types, str) else types[dataset]


# --- what a rank reads ----------------------------------------------------------------------
def tensor_entries(config, shard, is_root):
    """Tensor mode: (key, dataset, rows, cols) of every array a rank holds (None = all rows
    / columns): its slices of every matrix and of the classifier, the norms, and on root the
    whole token embedding. A tied classifier is read from the embedding's rows; a rank
    without classifier rows (scheme star: all are root's) holds none."""
    entries = [("tok_embeddings", "tok_embeddings", None, None)] if is_root else []
    classifier = "tok_embeddings" if config.tie_embeddings else "output"
    if shard.vocab_rows[1] > shard.vocab_rows[0]:
        entries.append(("output", classifier, shard.vocab_rows, None))
    entries.append(("norm", "norm", None, None))
    for layer in range(config.n_layers):
        prefix = f"layers/{layer}/"
        entries += [(prefix + n, prefix + n, None, None) for n in NORMS]
        entries += [(prefix + n, prefix + n, shard.rows(n), shard.cols(n))
                    for n in LAYER_MATRICES]
    return entries


def split_layers(n_layers, size):
    """Even contiguous layer ranges, one (start, stop) per rank; earlier ranks take the
    extra layers. dllm.profile.assign_layers splits by speed and memory instead."""
    return block_split(n_layers, size)


def stage_entries(config, layers, is_root):
    """Pipeline mode: (key, dataset, rows, cols) of every array a rank holds: whole matrices
    of its layers [a, b); root also the embedding, the final norm and the classifier (the
    embedding serves as classifier when tied)."""
    entries = []
    if is_root:
        entries += [("tok_embeddings", "tok_embeddings", None, None), ("norm", "norm", None, None)]
        if not config.tie_embeddings:
            entries.append(("output", "output", None, None))
    for layer in range(*layers):
        prefix = f"layers/{layer}/"
        entries += [(prefix + n, prefix + n, None, None) for n in NORMS + LAYER_MATRICES]
    return entries


# --- bytes ------------------------------------------------------------------------------------
def tensor_bytes(config, types, name, rows=None, cols=None):
    """Stored bytes of rows [a, b) x cols [c, d) of tensor `name` (None: all)."""
    dataset = "tok_embeddings" if name == "output" and config.tie_embeddings else name
    shape = tensor_shapes(config)[dataset]
    n_rows = shape[0] if rows is None else rows[1] - rows[0]
    if len(shape) == 1:
        return 4 * n_rows
    n_cols = shape[1] if cols is None else cols[1] - cols[0]
    return TYPES[type_of(types, dataset)].nbytes(n_rows, n_cols)


def entries_bytes(config, types, entries):
    """Stored bytes of a rank's entries (tensor_entries / stage_entries)."""
    return sum(tensor_bytes(config, types, name, rows, cols) for _, name, rows, cols in entries)


def layer_bytes(config, types):
    """Weights of one layer as stored: the largest layer's, when types differ by layer."""
    layers = range(config.n_layers) if isinstance(types, dict) else range(min(1, config.n_layers))
    return max((entries_bytes(config, types, stage_entries(config, (i, i + 1), False))
                for i in layers), default=0)


def kv_bytes(config, max_seq_len, kv_heads=None):
    """KV cache of one layer for one sequence (float32 keys and values)."""
    heads = config.n_kv_heads if kv_heads is None else kv_heads
    return 2 * heads * max_seq_len * config.head_dim * 4


def root_bytes(config, types):
    """What root holds besides layers in a pipeline: embedding, final norm, classifier."""
    return entries_bytes(config, types, stage_entries(config, (0, 0), True))


def stage_bytes(config, types, n_layers, is_root, max_seq_len, sequences=1):
    """Memory of a pipeline rank holding n_layers (weights + KV cache for `sequences`)."""
    per_layer = layer_bytes(config, types) + sequences * kv_bytes(config, max_seq_len)
    return n_layers * per_layer + (root_bytes(config, types) if is_root else 0)


def shard_bytes(config, types, shard, is_root, max_seq_len):
    """Memory of a tensor-parallel rank: its slices (tensor_entries) + its KV cache (scheme
    star: root's is the whole cache, the other ranks have none)."""
    weights = entries_bytes(config, types, tensor_entries(config, shard, is_root))
    return weights + config.n_layers * kv_bytes(config, max_seq_len, shard.n_cache_kv_heads)
