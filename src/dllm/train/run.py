"""python -m dllm.train: next-token training of a Llama over the MPI ranks.

    mpirun -n 4 python -m dllm.train --model m.h5 --text train.txt --val val.txt \\
        --steps 200 --batch 16 --seq-len 128 --lr 1e-3 --out trained.h5 --metrics run.jsonl

--batch is the global batch (sequences per step over all ranks), so a run means the same at
any rank count. --parallel data: each rank a shard of the batch, gradients summed in buckets
while the backward goes on (--grad-sync f32|q80|topk:K, dllm.train.gradsync); --parallel
tensor: every rank a slice of every matrix (dllm.train.model). A checkpoint is written every
--checkpoint-every steps; rerunning the same command continues from it, bit-identically to a
run that was never interrupted. The result is a dllm model file for dllm.generate.
"""
import json
import sys
import time
from pathlib import Path

import numpy as np

from ..atomic import append_lines, write_text
from .. import _threads
from ..cli import ArgumentParser, add_fault_options, add_thread_option, model_loaded, run, \
    use_fault_options
from ..output import root_print
from ..checks import check_paths
from ..comm import Comm
from ..config import ModelConfig
from ..errors import DllmError, on_one_rank
from ..modelfile import ModelFile, tensor_shapes
from ..stats import git_revision
from ..tokenizer import Tokenizer, read_tokenizer_file
from ..weight_types import NAMES as WEIGHT_TYPES, weight_type
from . import checkpoint, data
from .gradsync import GradSync, parse_grad_sync
from .model import grad_order, init_params, local_shapes, loss_and_grads, parameter_count, \
    tensor_split
from .optim import AdamW, squared_norm

PROG = "dllm.train"
# Shapes of models trained from scratch (--init); the vocabulary is the tokenizer's.
PRESETS = {
    "tiny": dict(dim=64, hidden_dim=192, n_layers=2, n_heads=4, n_kv_heads=2),
    "tinystories-1m": dict(dim=128, hidden_dim=384, n_layers=4, n_heads=4, n_kv_heads=2),
    "tinystories-6m": dict(dim=256, hidden_dim=768, n_layers=6, n_heads=8, n_kv_heads=4),
}
# The settings a checkpoint is tied to: a rerun with other values would be another run.
# (--threads is not one: it changes the time, not a number.)
RUN_SETTINGS = ("model", "init", "tokenizer", "text", "steps", "batch", "seq_len", "lr",
                "warmup", "min_lr_ratio", "weight_decay", "clip", "seed", "grad_sync",
                "bucket_kb", "parallel")


def build_parser(is_root=True):
    p = ArgumentParser(prog=f"python -m {PROG}", is_root=is_root,
                       description="Train a Llama over the MPI ranks (next-token loss).")
    start = p.add_mutually_exclusive_group(required=True)
    start.add_argument("--model", default=None, help="dllm model file to fine-tune")
    start.add_argument("--init", default=None, choices=sorted(PRESETS),
                       help="train from scratch, with random weights of this shape")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="tokenizer (tokenizer.model, llama2.c tokenizer.bin, tokenizer.json); "
                        "default the model's; --init needs one")
    p.add_argument("--text", required=True, help="training text (UTF-8; documents separated "
                                                 "by blank lines)")
    p.add_argument("--val", default=None, help="validation text: loss and perplexity")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    p.add_argument("--batch", type=int, default=8,
                   help="global batch: sequences per step over all ranks (default 8)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default 64)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--warmup", type=int, default=None,
                   help="linear warm-up steps (default a tenth of --steps)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1,
                   help="cosine decay ends at this fraction of --lr (default 0.1)")
    p.add_argument("--weight-decay", type=float, default=0.1,
                   help="AdamW decoupled weight decay of the matrices (default 0.1)")
    p.add_argument("--clip", type=float, default=1.0,
                   help="clip the global gradient norm to this (default 1; 0 = off)")
    p.add_argument("--seed", type=int, default=0, help="batches and initial weights (default 0)")
    p.add_argument("--parallel", default="data", choices=("data", "tensor"),
                   help="'data': each rank a shard of the batch (default); 'tensor': each "
                        "rank a slice of every matrix")
    p.add_argument("--grad-sync", default="f32", metavar="f32|q80|topk:K",
                   help="data parallel: gradient payload, float32, Q8_0 blocks, or the "
                        "fraction K of each bucket's largest entries with error feedback "
                        "(default f32)")
    p.add_argument("--bucket-kb", type=int, default=256,
                   help="data parallel: gradient bucket size in KiB of float32 (default 256)")
    p.add_argument("--out", required=True, help="the trained model file (.h5)")
    p.add_argument("--export-quant", default="q40", choices=WEIGHT_TYPES,
                   help="weight type of --out's layer matrices, the others as dllm.convert "
                        "stores them beside it (default q40: the classifier q80)")
    p.add_argument("--metrics", default=None, metavar="PATH",
                   help="JSON lines: one per step, one per validation")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="checkpoint file (default OUT.ckpt); a rerun continues from it")
    p.add_argument("--checkpoint-every", type=int, default=50,
                   help="steps between checkpoints (default 50; 0 = at the end only)")
    p.add_argument("--val-every", type=int, default=0,
                   help="steps between validations (default 0: at the end only)")
    p.add_argument("--val-windows", type=int, default=32,
                   help="validation windows of --seq-len tokens (default 32)")
    p.add_argument("--log-every", type=int, default=10, help="steps between progress lines")
    add_thread_option(p)
    add_fault_options(p)
    return p


def main(argv=None):
    return run(_main, argv, PROG)


def _main(comm, argv):
    train(comm, argv)
    return 0


def train(comm, argv):
    """The whole command on the dllm Comm `comm` (collective); returns the finished Trainer
    (its params: this rank's parts of the trained weights)."""
    args = build_parser(comm.is_root).parse_args(argv)
    args.checkpoint = args.checkpoint or args.out + ".ckpt"
    comm.from_root(check_paths, args)
    comm.from_root(check_settings, args, comm.size)
    _threads.use(args.threads)      # BLAS and numexpr pools: one thread per rank by default
    use_fault_options(comm, args, hint="rerun the same command to continue from the last "
                                       "checkpoint")
    trainer = Trainer(comm, args)
    trainer.run()
    return trainer


def check_settings(args, size):
    """Values no single flag's range covers; root, before any work."""
    if not args.lr > 0:
        raise DllmError(f"--lr must be positive, got {args.lr}")
    if not 0 <= args.min_lr_ratio <= 1 or args.weight_decay < 0 or args.clip < 0:
        raise DllmError("--min-lr-ratio must be in [0, 1]; --weight-decay and --clip >= 0")
    parse_grad_sync(args.grad_sync)
    if args.parallel == "tensor" and args.grad_sync != "f32":
        raise DllmError("--grad-sync applies to --parallel data (tensor parallel has no "
                        "gradient sync: each rank owns its slices' gradients)")
    if args.parallel == "data" and args.batch % size:
        raise DllmError(f"--batch {args.batch} is not divisible by {size} ranks "
                        f"(data parallel: each rank takes an equal share)")
    if args.init and not args.tokenizer:
        raise DllmError("--init needs --tokenizer (the vocabulary sets the model's shape)")


# --- the source model ----------------------------------------------------------------------
def read_source(args):
    """Root: (config, full float32 weights, tokenizer (kind, bytes)) of --model or --init."""
    tokenizer = read_tokenizer_file(args.tokenizer) if args.tokenizer else None
    if args.init:
        vocab = Tokenizer(*tokenizer).vocab_size
        config = ModelConfig(vocab_size=vocab, max_seq_len=max(256, args.seq_len),
                             **PRESETS[args.init]).check()
        return config, init_params(config, np.random.default_rng(args.seed)), tokenizer
    with ModelFile(args.model) as mf:
        config, tokenizer = mf.config, tokenizer or mf.tokenizer()
        params = {}
        for name in tensor_shapes(config):   # any stored type -> float32 master weights
            kind = weight_type(mf.tensor_quant(name))
            params[name] = np.asarray(kind.dequantize(mf.read(name)), np.float32)
    if tokenizer is None:
        raise DllmError(f"{args.model} has no tokenizer to read --text with: add --tokenizer")
    if Tokenizer(*tokenizer).vocab_size != config.vocab_size:
        raise DllmError(f"the tokenizer has {Tokenizer(*tokenizer).vocab_size} tokens but the "
                        f"model's vocabulary is {config.vocab_size}")
    if args.seq_len > config.max_seq_len:
        raise DllmError(f"--seq-len {args.seq_len} exceeds the model's context of "
                        f"{config.max_seq_len}")
    return config, params, tokenizer


def read_streams(args, tokenizer):
    """Root: the token streams of --text and --val (None without --val)."""
    tok = Tokenizer(*tokenizer)
    train = data.read_stream(args.text, tok, args.seq_len)
    val = data.read_stream(args.val, tok, args.seq_len, "--val") if args.val else None
    return train, val


class Trainer:
    """One run on every rank: the state (this rank's weights and moments), the step loop,
    validation, checkpoints and the export. Collective."""

    def __init__(self, comm, args):
        self.comm, self.args = comm, args
        self.settings = {k: getattr(args, k) for k in RUN_SETTINGS}
        self.settings["world_size"] = comm.size
        if args.parallel == "tensor":
            self.tensor_comm, self.data_comm = comm, None
        else:
            self.tensor_comm, self.data_comm = Comm.self_comm(), comm
        config, full, self.tokenizer = comm.from_root(read_source, args)
        self.config = config
        self.split = comm.agree(tensor_split, config, self.tensor_comm)
        self.train_stream, self.val_stream = comm.from_root(read_streams, args, self.tokenizer)
        warmup = args.warmup if args.warmup is not None else max(1, args.steps // 10)
        self.optim = AdamW(args.lr, warmup, args.steps, args.min_lr_ratio,
                           weight_decay=args.weight_decay, clip=args.clip)
        shapes = local_shapes(self.split)
        self.sync = None if self.data_comm is None else GradSync(
            self.data_comm, grad_order(config), shapes, args.grad_sync, args.bucket_kb << 10)
        self.step = 0
        self.pending = []           # metrics lines not yet written (root)
        self.params = {k: self.split.local(k, v) for k, v in full.items()}
        self.m = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
        self.v = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
        # Replicated tensors count once in the global gradient norm of a tensor group.
        self.sharded = [k for k in shapes if self.split.axis(k) is not None]
        self.replicated = [k for k in shapes if self.split.axis(k) is None]
        self.resume()

    # --- resuming ---------------------------------------------------------------------------
    def resume(self):
        comm, args = self.comm, self.args
        state = comm.from_root(self._read_checkpoint)
        if state is None:
            if comm.is_root and args.metrics:   # a header: what the lines that follow are of
                header = {"step": 0, "run": {**self.settings, "parameters":
                                             parameter_count(self.config),
                                             "git_revision": git_revision()}}
                on_one_rank(write_text, args.metrics, json.dumps(header) + "\n")
            return
        self.step = state["step"]
        for name in self.params:
            self.params[name] = self.split.local(name, state["params"][name])
            self.m[name] = self.split.local(name, state["m"][name])
            self.v[name] = self.split.local(name, state["v"][name])
        if self.sync is not None and self.sync.residuals is not None:
            self.sync.restore(None if state["residuals"] is None
                              else state["residuals"][comm.rank])
        root_print(comm, f"{PROG}: continuing from {args.checkpoint} after step {self.step}",
                   file=sys.stderr)

    def _read_checkpoint(self):
        """Root: the checkpoint's state when it exists and belongs to this command, with the
        metrics file cut back to its step; None to start afresh."""
        args = self.args
        if not Path(args.checkpoint).exists():
            return None
        state = checkpoint.read(args.checkpoint)
        recorded = state["settings"]
        for key, value in self.settings.items():
            if key != "world_size" and recorded.get(key) != value:
                raise DllmError(f"checkpoint {args.checkpoint} is of another run (its "
                                f"--{key.replace('_', '-')} is {recorded.get(key)}, not "
                                f"{value}): remove it or choose another --checkpoint")
        if recorded["world_size"] != self.comm.size:
            if args.grad_sync.startswith("topk"):
                raise DllmError(f"checkpoint {args.checkpoint} holds the top-k residuals of "
                                f"{recorded['world_size']} ranks: continue on that many")
            print(f"{PROG}: warning: the checkpoint was made on {recorded['world_size']} "
                  f"ranks: the sums round differently on {self.comm.size}", file=sys.stderr)
        if args.metrics:
            keep_metrics_until(args.metrics, state["step"])
        return state

    # --- the loop ---------------------------------------------------------------------------
    def run(self):
        args, comm = self.args, self.comm
        c = self.config
        root_print(comm, f"--- {PROG}: {comm.size} rank(s) {args.parallel}-parallel"
                         f"{', grad sync ' + args.grad_sync if self.sync else ''}; "
                         f"{parameter_count(c):,} parameters (dim {c.dim}, {c.n_layers} "
                         f"layers); {len(self.train_stream):,} training tokens; global batch "
                         f"{args.batch} x {args.seq_len}", file=sys.stderr)
        if self.step == 0 and args.val_every:
            self.validate()                 # where the curve starts
        while self.step < args.steps:
            record = self.train_step(self.step + 1)
            self.step += 1
            if self.step == 1:
                model_loaded(comm)          # waits are now held to --timeout
            if args.val_every and self.step % args.val_every == 0 and self.step < args.steps:
                self.validate()
            self.log(record)
            if (args.checkpoint_every and self.step % args.checkpoint_every == 0) \
                    or self.step == args.steps:
                self.save()
        if self.val_stream is not None:
            self.validate()
        self.export()

    def train_step(self, step):
        """One optimizer step of the global batch; returns the step's metrics (root's)."""
        args, comm = self.args, self.comm
        tokens = data.batch(self.train_stream, args.seed, step, args.batch, args.seq_len)
        if self.data_comm is not None:
            tokens = tokens[data.rank_rows(args.batch, comm.rank, comm.size)]
        d_loss = 1.0 / (args.batch * args.seq_len)
        started, before = time.perf_counter(), comm.stats.snapshot()
        on_ready = self.sync.ready if self.sync is not None else None
        loss, grads = loss_and_grads(self.params, self.split, tokens, self.tensor_comm, d_loss,
                                     on_ready)
        if self.sync is not None:
            grads = self.sync.finish()
        grad_comm = comm.stats.since(before)
        idle = self.sync.wait_seconds if self.sync is not None else 0.0
        loss = self.sum_over_data(loss)        # the same on every rank: all stop together
        norm = np.sqrt(self.grad_norm_squared(grads))   # the same on every rank, too
        if not (np.isfinite(loss) and np.isfinite(norm)):
            raise DllmError(f"the training loss is {loss} and the gradient norm {norm} at step "
                            f"{step}: lower --lr or raise --warmup (the last checkpoint is "
                            f"unchanged)")
        scale = np.float32(self.optim.clip_scale(norm))
        lr = self.optim.lr_at(step)
        for name, param in self.params.items():
            g = grads[name] * scale if scale != 1 else grads[name]
            self.optim.update(param, g, self.m[name], self.v[name], step, lr)
        seconds = time.perf_counter() - started
        spent = comm.stats.since(before)
        mean = loss * d_loss
        # compute + comm + idle = the step: idle is the wait for gradient buckets after the
        # backward (what the overlap did not hide), comm every other moment inside MPI.
        return {"step": step, "loss": mean, "lr": lr, "grad_norm": float(norm),
                "tokens_per_s": args.batch * args.seq_len / seconds,
                "step_ms": 1e3 * seconds, "compute_ms": 1e3 * (seconds - spent.sync_seconds),
                "comm_ms": 1e3 * (spent.sync_seconds - idle), "idle_ms": 1e3 * idle,
                "grad_bytes": grad_comm.bytes_sent if self.sync is not None else 0,
                "bytes_sent": spent.bytes_sent, "bytes_received": spent.bytes_received}

    def sum_over_data(self, value):
        """A float summed over the data-parallel ranks (itself in tensor parallel)."""
        if self.data_comm is None:
            return value
        return float(self.data_comm.allreduce_sum(np.array([value]))[0])

    def grad_norm_squared(self, grads):
        """The global gradient norm squared: sharded parts summed over the tensor group."""
        sharded = squared_norm(grads, self.sharded)
        if self.sharded:
            sharded = float(self.tensor_comm.allreduce_sum(np.array([sharded]))[0])
        return sharded + squared_norm(grads, self.replicated)

    # --- validation -------------------------------------------------------------------------
    def validate(self):
        """Mean next-token loss and perplexity over the --val windows (data parallel: the
        windows shared out over the ranks)."""
        args, comm = self.args, self.comm
        if self.val_stream is None:
            return
        windows = data.validation_windows(self.val_stream, args.seq_len, args.val_windows)
        if self.data_comm is not None:
            windows = np.array_split(windows, comm.size)[comm.rank]
        total = 0.0
        for start in range(0, len(windows), args.batch):
            part = windows[start:start + args.batch]
            total += loss_and_grads(self.params, self.split, part, self.tensor_comm, 1.0,
                                    grads=False)[0]
        count = min(args.val_windows, (len(self.val_stream) - 1) // args.seq_len) * args.seq_len
        loss = self.sum_over_data(total) / count
        record = {"step": self.step, "val_loss": loss, "val_perplexity": float(np.exp(loss)),
                  "val_tokens": count}
        root_print(comm, f"{PROG}: step {self.step} validation loss {loss:.4f} perplexity "
                         f"{np.exp(loss):.3f} ({count} tokens)", file=sys.stderr)
        self.pending.append(json.dumps(record))
        self.flush_metrics()

    def log(self, record):
        """Root: the step's metrics line (written with the next progress line or checkpoint:
        one file rewrite and fsync for many steps) and a progress line on stderr."""
        args, comm = self.args, self.comm
        self.pending.append(json.dumps(record))
        if self.step % args.log_every == 0 or self.step in (1, args.steps):
            self.flush_metrics()
            root_print(comm, f"{PROG}: step {self.step}/{args.steps} loss {record['loss']:.4f} "
                             f"lr {record['lr']:.2e} {record['tokens_per_s']:.0f} tokens/s "
                             f"compute {record['compute_ms']:.0f} ms comm "
                             f"{record['comm_ms']:.0f} ms idle {record['idle_ms']:.0f} ms "
                             f"grad {record['grad_bytes']:,} B", file=sys.stderr)

    def flush_metrics(self):
        """Root: append the pending metrics lines to --metrics (atomically, all at once)."""
        if self.comm.is_root and self.args.metrics and self.pending:
            on_one_rank(append_lines, self.args.metrics, self.pending)
        self.pending = []

    # --- checkpoints and the export ---------------------------------------------------------
    def gather(self, arrays):
        """Root: the full tensors of this rank's parts (None elsewhere). Collective."""
        full = {}
        for name in self.params:
            widths, local = self.split.widths(name), arrays[name]
            if widths is None:
                full[name] = local
                continue
            axis = self.split.axis(name)[0]
            part = np.ascontiguousarray(local.T if axis == 0 else local)
            got = self.comm.gather_rows(part, widths)            # Gatherv -> root
            if got is not None:
                full[name] = got.T.copy() if axis == 0 else got
        return full if self.comm.is_root else None

    def save(self):
        """Every rank: the state after this step into --checkpoint (root writes it)."""
        comm = self.comm
        full = [self.gather(a) if self.tensor_comm.size > 1 else a
                for a in (self.params, self.m, self.v)]
        residuals = None
        if self.sync is not None and self.sync.residuals is not None:
            mine = self.sync.state()
            everyone = comm.gather(mine)
            residuals = np.stack(everyone) if comm.is_root else None
        self.flush_metrics()        # the lines up to this step, before the state they are of
        if comm.is_root:
            on_one_rank(checkpoint.write, self.args.checkpoint, self.step, self.settings,
                        self.config, self.tokenizer, full[0], {"m": full[1], "v": full[2]},
                        residuals)
        comm.barrier()

    def export(self):
        args, comm = self.args, self.comm
        params = self.gather(self.params) if self.tensor_comm.size > 1 else self.params
        if comm.is_root:
            metadata = {"source": f"dllm.train of {args.model or 'init ' + args.init}",
                        "source_format": "dllm.train", "steps": args.steps,
                        "git_revision": git_revision() or "unknown"}
            on_one_rank(checkpoint.export, args.out, self.config, params, self.tokenizer,
                        args.export_quant, metadata)
            print(f"{PROG}: wrote {args.out} ({args.export_quant}) after {args.steps} steps",
                  file=sys.stderr, flush=True)
        comm.barrier()


def keep_metrics_until(path, step):
    """Root: drop the lines of steps after `step` from a metrics file (a crash after the
    last checkpoint leaves lines the rerun writes again)."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    write_text(path, "".join(line + "\n" for line in kept))
