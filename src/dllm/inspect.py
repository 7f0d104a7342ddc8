"""python -m dllm.inspect MODEL.h5 [--ranks N]: what is inside a model file.

Prints the config, the tokenizer, the tensors with their types and sizes (layers that share
shapes and types grouped on one line), and the memory each of N ranks will hold: its weight
slices (shard.plan, as dllm.load reads them) and its KV cache. Reads only attributes and
dataset shapes, never the weights. Not a collective: runs in one process, MPI not needed.
"""
import re
import sys
from collections import OrderedDict

from .cli import ArgumentParser
from .errors import DllmError, exit_status
from .modelfile import ModelFile, tensor_shapes
from .placement import entries_bytes, kv_bytes, tensor_entries
from .shard import SCHEMES, plan

PROG = "dllm.inspect"


def build_parser():
    p = ArgumentParser(prog=f"python -m {PROG}", description=__doc__.splitlines()[0])
    p.add_argument("model", help="dllm HDF5 model file")
    p.add_argument("--ranks", type=int, default=None,
                   help="also show the memory each of N ranks holds (default: 1, 2, 4, 8 "
                        "where the model splits)")
    p.add_argument("--sync-scheme", default="slices", choices=SCHEMES,
                   help="sharding scheme the ranks will use (default slices)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="context to size the KV cache for (default: the model's)")
    return p


def main(argv=None):
    try:
        args = build_parser().parse_args(argv)
        with ModelFile(args.model) as mf:
            print(describe(mf, args.ranks, args.sync_scheme, args.max_seq_len))
    except DllmError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        return exit_status(exc)
    except BrokenPipeError:
        return 0
    return 0


def describe(mf, ranks=None, scheme="slices", max_seq_len=None):
    """The whole report as text."""
    c = mf.config
    lines = [f"model       {mf.path} ({_size(mf.path.stat().st_size)}), dllm format "
             f"v{mf.version}, matrices {mf.quant}",
             f"config      dim {c.dim}, hidden {c.hidden_dim}, layers {c.n_layers}, heads "
             f"{c.n_heads} (kv {c.n_kv_heads}, head_dim {c.head_dim}), vocab {c.vocab_size}",
             f"            context {c.max_seq_len}, rope theta {c.rope_theta:g}"
             f"{_rope_scaling(c)}, norm eps {c.norm_eps:g}, "
             f"{'tied' if c.tie_embeddings else 'separate'} classifier, bos {c.bos_id}, "
             f"eos {c.eos_id}"]
    unpadded = mf.h5.attrs.get("hidden_dim_unpadded")
    if unpadded is not None:
        lines.append(f"            hidden_dim padded from {int(unpadded)} with zero units")
    lines.append(f"tokenizer   {_tokenizer(mf)}")
    for key, value in sorted(mf.metadata().items()):
        lines.append(f"{'metadata' if key == sorted(mf.metadata())[0] else '':12s}"
                     f"{key} = {value}")
    lines += ["", *tensor_table(mf), ""]
    lines += memory_table(mf, ranks, scheme, max_seq_len or c.max_seq_len)
    return "\n".join(lines)


def _rope_scaling(c):
    if c.rope_scaling == "none":
        return ""
    if c.rope_scaling == "linear":
        return f" (linear scaling x{c.rope_factor:g})"
    return (f" (llama3 scaling x{c.rope_factor:g}, low/high freq factors "
            f"{c.rope_low_freq_factor:g}/{c.rope_high_freq_factor:g}, original context "
            f"{c.rope_original_max_seq_len})")


def _tokenizer(mf):
    embedded = mf.tokenizer()
    if embedded is None:
        return "none (logits and token ids only; text needs --tokenizer)"
    kind, blob = embedded
    from .tokenizer import Tokenizer
    try:
        tok = Tokenizer(kind, blob)
        text = f"{kind}, {tok.vocab_size} tokens, bos {tok.bos_id}, eos {tok.eos_id}"
    except DllmError as exc:
        text = f"{kind}, {len(blob)} bytes (cannot be loaded here: {exc})"
    template = mf.chat_template()
    return text + (f", chat template {template}" if template else ", no chat template")


def tensor_table(mf):
    """One line per tensor; per-layer tensors whose type and shape agree on every layer
    are grouped as layers/*/name."""
    groups = OrderedDict()
    for name in tensor_shapes(mf.config):
        ds = mf.h5[name]
        key = re.sub(r"^layers/\d+/", "layers/*/", name)
        row = (_text(ds.attrs.get("quant")), tuple(int(n) for n in ds.attrs.get("shape", ds.shape)),
               ds.id.get_storage_size(), _text(ds.attrs.get("source_type", "")),
               ds.attrs.get("quant_rms_err"))
        groups.setdefault(key, []).append(row)
    out = [f"{'tensor':24s} {'type':>4s} {'shape':>14s} {'bytes':>10s} {'count':>6s} "
           f"{'from':>8s} {'rms err':>9s}"]
    for key, rows in groups.items():
        kinds = {r[:2] for r in rows}
        if len(kinds) > 1:      # layers differ: list them one by one
            for i, r in enumerate(rows):
                out.append(_tensor_line(key.replace("*", str(i)), [r]))
        else:
            out.append(_tensor_line(key, rows))
    total = sum(r[2] for rows in groups.values() for r in rows)
    out.append(f"{'total':24s} {'':>4s} {'':>14s} {_size(total):>10s}")
    return out


def _tensor_line(name, rows):
    quant, shape, nbytes, source, err = rows[0]
    errs = [r[4] for r in rows if r[4] is not None]
    err_text = f"{max(errs):9.2e}" if errs else f"{'-':>9s}"
    return (f"{name:24s} {quant:>4s} {'x'.join(map(str, shape)):>14s} {_size(nbytes):>10s} "
            f"{'x' + str(len(rows)) if len(rows) > 1 else '':>6s} {source:>8s} {err_text}")


def memory_table(mf, ranks, scheme, max_seq_len):
    """Weights and KV cache per rank for each world size asked (or 1, 2, 4, 8)."""
    c = mf.config
    sizes = [ranks] if ranks is not None else [n for n in (1, 2, 4, 8) if n <= c.n_heads]
    out = [f"memory per rank (scheme {scheme}, KV cache for {max_seq_len} tokens, float32)"]
    for size in sizes:
        shards = plan(c, size, scheme)   # raises DllmError naming the numbers
        out.append(f"  {size} rank{'s' if size > 1 else ''}: "
                   f"{'rank':>4s} {'weights':>10s} {'kv cache':>10s} {'total':>10s}")
        for shard in shards:
            weights = rank_weight_bytes(mf, shard, shard.rank == 0)
            kv = c.n_layers * kv_bytes(c, max_seq_len, shard.n_cache_kv_heads)
            out.append(f"  {'':9s}{shard.rank:>4d} {_size(weights):>10s} {_size(kv):>10s} "
                       f"{_size(weights + kv):>10s}")
    return out


def rank_weight_bytes(mf, shard, is_root):
    """Bytes of the stored slices a rank reads (placement.tensor_entries)."""
    return entries_bytes(mf.config, mf.types(), tensor_entries(mf.config, shard, is_root))


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


def _size(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


if __name__ == "__main__":
    sys.exit(main())
