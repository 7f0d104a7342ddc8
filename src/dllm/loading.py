"""Loading a model file onto the ranks: validate on root, then each rank reads its slices.

Two ways for weights to reach a rank:
- "file" (default): every rank opens the file read-only (shared filesystem or a copy per
  host) and reads only its own rows, one hyperslab per matrix; root also reads the unsplit
  token embedding.
- "root": only root reads the file and sends each rank its slices, for clusters without a
  shared filesystem (as Distributed Llama does).
"""
import socket

import numpy as np

from .backend import make as make_kernels
from .config import ModelConfig
from .errors import DllmError
from .model import Model, prepare_weight
from .modelfile import ModelFile
from .placement import shard_bytes, stage_bytes, stage_entries, tensor_entries
from .profile import (_mb, check_tensor_memory, pipeline_stages, tensor_shares,
                      use_profile)
from .shard import plan
from .sync import PAYLOADS
from .tokenizer import Tokenizer
from .weight_types import TYPES

WEIGHTS_FROM = ("file", "root")
PARALLEL = ("tensor", "pipeline")


def check_scheme(shards, types, n_layers):
    """Row-parallel schemes cut wo and w2 by columns: a block type (Q4_0, Q8_0) needs each
    rank's columns in whole blocks. "slices" and "star" cut only rows: any split works
    (in star a rank may hold no kv head: its wk and wv slices are empty)."""
    if not shards[0].row_parallel:
        return
    blocked = {TYPES[types[f"layers/{i}/{n}"]] for i in range(n_layers)
               for n in ("wo", "w2")} if isinstance(types, dict) else {TYPES[types]}
    block = max(t.block for t in blocked)
    if block == 1:
        return
    for s in shards:
        for a, b in (s.q_rows, s.hidden_rows):
            if a % block or b % block:
                raise DllmError(
                    f"--sync-scheme {s.scheme} with {'/'.join(sorted(t.ggml for t in blocked))} "
                    f"weights needs each rank's attention and hidden columns in whole "
                    f"{block}-value blocks; rank {s.rank} has columns {a}..{b} (head_dim "
                    f"{s.head_dim}): use --sync-scheme slices")


def check_options(sync, weights_from, max_seq_len, prefill_chunk):
    if sync not in PAYLOADS:
        raise DllmError(f"--sync must be one of {', '.join(PAYLOADS)}, got {sync!r}")
    if weights_from not in WEIGHTS_FROM:
        raise DllmError(f"--weights-from must be one of {', '.join(WEIGHTS_FROM)}, "
                        f"got {weights_from!r}")
    if max_seq_len is not None and max_seq_len < 1:
        raise DllmError(f"max_seq_len (--max-seq-len) must be positive, got {max_seq_len}")
    if prefill_chunk < 1:
        raise DllmError(f"prefill chunk must be positive, got {prefill_chunk}")


def _read_header(path):
    with ModelFile(path) as mf:
        return mf.config.to_dict(), mf.types()


def _read_local(path, entries, is_root, prepare):
    try:
        with ModelFile(path) as mf:
            return {key: prepare(key, mf.read(name, rows, cols), mf.tensor_quant(name))
                    for key, name, rows, cols in entries}
    except DllmError as exc:
        if is_root:
            raise
        # Root could read it, this rank cannot: most likely no shared filesystem.
        raise DllmError(f"{exc} (on {socket.gethostname()}; without a shared filesystem "
                        f"use --weights-from root)") from None


def _load_tokenizer(path, tokenizer_path, config):
    if tokenizer_path is not None:
        tok = Tokenizer.from_file(tokenizer_path)
    else:
        with ModelFile(path) as mf:
            embedded = mf.tokenizer()
        if embedded is None:
            return None
        tok = Tokenizer(*embedded)
    if tok.vocab_size != config.vocab_size:
        raise DllmError(f"tokenizer has {tok.vocab_size} tokens but the model's vocabulary "
                        f"is {config.vocab_size}")
    return tok


def available_memory():
    """Bytes this host can still give to new allocations (MemAvailable), None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_host_memory(comm, need, context):
    """Collective: refuse to load, on every rank alike and before anything is allocated,
    when the ranks that share a host need more memory than it has available. need: this
    rank's weights and KV cache in bytes (dllm.placement.shard_bytes / stage_bytes)."""
    hosts = {}
    for rank, (host, n, free) in enumerate(comm.allgather(
            (socket.gethostname(), int(need), available_memory()))):
        ranks, total, least_free = hosts.get(host, ([], 0, free))
        frees = [f for f in (least_free, free) if f is not None]
        hosts[host] = (ranks + [rank], total + n, min(frees) if frees else None)
    for host, (ranks, total, free) in hosts.items():
        if free is not None and total > free:
            who = (f"rank {ranks[0]} on {host} needs" if len(ranks) == 1
                   else f"the {len(ranks)} ranks on {host} need")
            raise DllmError(f"{who} {_mb(total)} for weights and a KV cache of "
                            f"{context} tokens, but {host} has {_mb(free)} available: lower "
                            f"--max-seq-len, spread the model over more hosts, or free memory")


def read_weights(comm, path, weights_from, entries_of, prepare=None):
    """Collective: this rank's arrays {key: array}, entries_of(rank) listing every rank's
    (key, dataset, rows, cols): each rank reads its own ("file"), or root reads and sends
    them ("root"). prepare(key, array, weight type), if given, turns each array into what
    the rank keeps as soon as it is read (kernels' layout), so that only one stored copy
    exists at a time."""
    prepare = prepare or (lambda key, array, wtype: array)
    if weights_from == "file":
        return comm.agree(_read_local, path, entries_of(comm.rank), comm.is_root, prepare)
    return _weights_from_root(comm, path, entries_of, prepare)


def _weights_from_root(comm, path, entries_of, prepare):
    """Root reads every rank's arrays (entries_of(rank): see placement) and sends them;
    returns this rank's weights. When root refuses the file (a NaN scale in rank 2's slice),
    every rank still waiting for an array is told at once instead of the next header, and
    all raise root's error together: none waits for the load timeout."""
    if comm.is_root:
        served, error = 1, None
        try:
            with ModelFile(path) as mf:
                for served in range(1, comm.size):
                    for key, name, rows, cols in entries_of(served):
                        array = mf.read(name, rows, cols)
                        comm.send_obj((array.shape, array.dtype.str, mf.tensor_quant(name)),
                                      served, tag=1)
                        comm.send_array(array, served, tag=2)
                served = comm.size
                weights = {key: prepare(key, mf.read(name, rows, cols), mf.tensor_quant(name))
                           for key, name, rows, cols in entries_of(0)}
        except DllmError as exc:
            error = str(exc)
            for rank in range(served, comm.size):
                comm.send_obj(None, rank, tag=1)      # instead of the next array's header
    else:
        weights = {}
        for key, name, rows, cols in entries_of(comm.rank):
            header = comm.recv_obj(source=0, tag=1)
            if header is None:
                break
            shape, dtype, wtype = header
            weights[key] = prepare(key, comm.recv_array(shape, np.dtype(dtype), source=0,
                                                        tag=2), wtype)
    error = comm.bcast(error if comm.is_root else None)
    if error is not None:
        raise DllmError(error)
    return weights


def load(path, comm=None, sync="q80", max_seq_len=None, weights_from="file",
         tokenizer=None, prefill_chunk=64, sync_scheme="slices", parallel="tensor",
         profile=None, kernels=None, threads=None):
    """Load a dllm HDF5 model over the ranks of `comm`; collective (every rank calls it).

    comm: None (COMM_WORLD), an mpi4py communicator or a dllm Comm. sync: activation payload,
    "q80" or "f32". max_seq_len: context to allocate (default: the model's). weights_from:
    "file" (each rank reads its own slices) or "root". tokenizer: path of a SentencePiece
    model overriding the embedded one. sync_scheme: "slices" (Allgather of output slices),
    "partials" (Allgather of row-parallel partial sums), "reduce" (reduce-scatter by
    Alltoall, then Allgather) or "star" (every exchange through root, which alone attends,
    holds the KV cache and the classifier: the paper's Distributed Llama 0.1).
    parallel: "tensor" (every rank a slice of every matrix, a dllm.model.Model) or
    "pipeline" (every rank whole layers, a dllm.pipeline.PipelineModel).
    profile: a device profile (path, dict or dllm.profile.Profile; docs/parallelism.md): layers
    by speed within memory for "pipeline", uneven slices by speed for "tensor".
    kernels: "numpy" or "fast" (default: DLLM_KERNELS, else "fast" when numba is installed;
    dllm.backend). threads: compute threads per rank (default: DLLM_THREADS, else 1).
    Raises DllmError on every rank for bad input.
    """
    from .comm import Comm
    comm = Comm.wrap(comm)
    check_options(sync, weights_from, max_seq_len, prefill_chunk)
    kernels = comm.agree(make_kernels, kernels, threads)
    if parallel not in PARALLEL:
        raise DllmError(f"--parallel must be one of {', '.join(PARALLEL)}, got {parallel!r}")
    if parallel == "pipeline" and sync_scheme != "slices":
        raise DllmError(f"--sync-scheme {sync_scheme} applies to --parallel tensor only")
    config_dict, types = comm.from_root(_read_header, path)
    config = ModelConfig.from_dict(config_dict)
    if max_seq_len is not None and max_seq_len > config.max_seq_len:
        raise DllmError(f"max_seq_len (--max-seq-len) {max_seq_len} exceeds the model's context of "
                        f"{config.max_seq_len}")
    profile = use_profile(comm, profile)
    context = max_seq_len or config.max_seq_len

    def prepare(key, array, wtype):     # kernels' layout as each array is read
        return prepare_weight(kernels, key, array, wtype)

    if parallel == "pipeline":
        from .pipeline import PipelineModel
        stages = pipeline_stages(config, types, comm.size, profile, context)
        start, stop = stages[comm.rank]
        check_host_memory(comm, stage_bytes(config, types, stop - start, comm.is_root, context),
                          context)
        tok = comm.root_only(_load_tokenizer, path, tokenizer, config)
        weights = read_weights(comm, path, weights_from,
                               lambda rank: stage_entries(config, stages[rank], rank == 0),
                               prepare)
        return PipelineModel(comm, config, stages, weights, types, sync=sync,
                             max_seq_len=max_seq_len, prefill_chunk=prefill_chunk,
                             tokenizer=tok, path=str(path), profile=stages.profile,
                             kernels=kernels)
    shares = tensor_shares(config, types, profile, context, sync_scheme) if profile else None
    shards = plan(config, comm.size, sync_scheme, shares)  # raises on every rank if it cannot
    check_scheme(shards, types, config.n_layers)
    if profile:
        check_tensor_memory(config, types, profile, shards, context)
    check_host_memory(comm, shard_bytes(config, types, shards[comm.rank], comm.is_root, context),
                      context)
    tok = comm.root_only(_load_tokenizer, path, tokenizer, config)
    weights = read_weights(comm, path, weights_from,
                           lambda rank: tensor_entries(config, shards[rank], rank == 0), prepare)
    return Model(comm, config, shards, weights, types, sync=sync, max_seq_len=max_seq_len,
                 prefill_chunk=prefill_chunk, tokenizer=tok, path=str(path), kernels=kernels)
