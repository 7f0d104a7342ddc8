"""python -m dllm.convert: checkpoints to the dllm model file.

    python -m dllm.convert SRC -o OUT.h5 [--quant q40|q80|f16|bf16|f32|keep]
        [--output-quant T] [--embedding-quant T] [--other-quant T] [--tokenizer PATH]
    python -m dllm.convert synthetic --preset llama2-7b [--layers N] [--tokenizer PATH] -o OUT.h5

SRC is a Hugging Face Llama folder, a GGUF file or a llama2.c .bin, told apart by content
(dllm.converters). Tensors are read and written one at a time, in blocks of rows, so memory
stays bounded; the file is written under a temporary name and renamed when complete. A
progress bar and a closing table of each tensor's quantization error go to stderr.
SIGINT and SIGTERM remove the temporary file; one left by a killed conversion is removed by
the next conversion to the same name.
"""
import os
import signal
import sys
import threading

from .atomic import interrupted
from .cli import ArgumentParser
from .converters import FORMATS, detect_format, open_checkpoint
from .converters.common import (QUANT_CHOICES, TypePolicy, error_table, prepare,
                                with_tokenizer, write_checkpoint)
from .converters.hf import HF_NAMES, hf_to_interleaved  # noqa: F401  (public API)
from .converters.synthetic import PRESETS, read_synthetic
from .errors import DllmError, exit_status
from .atomic import remove_stale_temporaries
from .checks import check_paths
from .tokenizer import CHAT_TEMPLATES
from .weight_types import describe_types

PROG = "dllm.convert"


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so that write_model removes its temporary file
    (a BaseException, so no `except Exception` on the way swallows it)."""


def convert(source, out, quant=None, fmt=None, tokenizer=None, chat_template=None,
            progress=False, log=print, allow_nonfinite=False, output_quant=None,
            embedding_quant=None, other_quant=None):
    """Convert one checkpoint to `out`; returns (config, TensorReports). quant,
    output_quant, embedding_quant, other_quant: the weight types (common.TypePolicy; None:
    its defaults). Warnings go to log; progress: draw a progress bar on stderr;
    allow_nonfinite: convert NaN/inf weights instead of refusing them."""
    fmt = fmt or detect_format(source)
    policy = TypePolicy.of(quant, output_quant, embedding_quant, other_quant, fmt)
    ckpt = prepare(with_tokenizer(open_checkpoint(source, fmt, tokenizer), tokenizer,
                                  chat_template), policy, allow_nonfinite)
    return ckpt.config, _write(ckpt, out, progress, log)


def convert_hf(folder, out, quant="q40", log=print):
    """Convert a Hugging Face Llama folder; returns its ModelConfig."""
    return convert(folder, out, quant, fmt="hf", log=log)[0]


def convert_synthetic(preset, out, layers=None, seed=0, progress=False, log=print,
                      tokenizer=None, chat_template=None, quant="q40"):
    """Write random Q4_0 weights of a preset's shapes (stored as `quant`: Q4_0 copied,
    another type requantized from them), with the tokenizer file `tokenizer` (of the
    preset's vocabulary size) when given; returns (config, TensorReports)."""
    policy = TypePolicy.of(quant, fmt="synthetic")
    ckpt = prepare(with_tokenizer(read_synthetic(preset, layers, seed), tokenizer,
                                  chat_template), policy)
    return ckpt.config, _write(ckpt, out, progress, log)


def _write(ckpt, out, progress, log):
    for warning in ckpt.warnings:
        log(f"{PROG}: warning: {warning}")
    for stale in remove_stale_temporaries(out):
        log(f"{PROG}: removed {stale}, left by a conversion that no longer runs")
    return write_checkpoint(ckpt, out, progress)


def build_parser():
    p = ArgumentParser(prog=f"python -m {PROG}", description=__doc__.splitlines()[0])
    p.add_argument("source", help="Hugging Face folder, .gguf file, llama2.c .bin, or the "
                                  "word 'synthetic' (with --preset)")
    p.add_argument("-o", "--output", required=True, help="output .h5 model file")
    p.add_argument("--quant", default=None, choices=QUANT_CHOICES,
                   help="weight type of the layers' matrices; keep: each tensor's source "
                        "type where dllm has it (GGUF: copied byte for byte). Default: keep "
                        "for GGUF, else q40")
    p.add_argument("--output-quant", default=None, choices=QUANT_CHOICES,
                   help="weight type of the classifier (default: q80 when --quant is q40, "
                        "else as --quant; docs/conversion.md)")
    p.add_argument("--embedding-quant", default=None, choices=QUANT_CHOICES,
                   help="weight type of the token embedding (default: as --quant)")
    p.add_argument("--other-quant", default=None, choices=QUANT_CHOICES[:-1],
                   help="with keep: the type for source types dllm lacks (GGUF K-quants "
                        "Q4_K, Q6_K, ...: dequantized, requantized; default q80)")
    p.add_argument("--format", default=None, choices=FORMATS,
                   help="source format (default: detected from the content)")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="tokenizer to embed instead of the checkpoint's (synthetic: one of "
                        "the preset's vocabulary size): tokenizer.model, llama2.c "
                        "tokenizer.bin or tokenizer.json")
    p.add_argument("--chat-template", default=None, choices=CHAT_TEMPLATES + ("none",),
                   help="chat template to store (default: detected from the checkpoint)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="synthetic: the model shape")
    p.add_argument("--layers", type=int, default=None,
                   help="synthetic: number of layers (default: the preset's)")
    p.add_argument("--seed", type=int, default=None, help="synthetic: random seed (default 0)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar and no error table (warnings still print)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="convert weights holding NaN or inf instead of refusing them (Q4_0 "
                        "turns them into finite values; dllm.load refuses them in f32)")
    return p


def main(argv=None):
    previous = _catch_sigterm()
    args, before = None, False      # False: interrupted before the output was looked at
    try:
        args = build_parser().parse_args(argv)
        before = _identity(args.output)
        return _main(args)
    except DllmError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        return exit_status(exc)
    except (KeyboardInterrupt, Terminated) as exc:   # write_model removed its temporary file
        print(f"{PROG}: interrupted; {_on_disk(args and args.output, before)}",
              file=sys.stderr, flush=True)
        return 143 if isinstance(exc, Terminated) else 130   # 128 + SIGTERM / SIGINT
    finally:
        interrupted(None)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _catch_sigterm():
    """Make SIGTERM raise Terminated (only the main thread may set handlers); returns the
    handler to restore, or None."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def terminated(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # let the cleanup finish
        exc = Terminated()
        interrupted(exc)                # stops the rename even if this raise is swallowed
        raise exc
    return signal.signal(signal.SIGTERM, terminated)


def _identity(path):
    """What names the file at `path` now (inode, size, change time), None when absent."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_ctime_ns


def _on_disk(path, before):
    """What an interrupt left: the rename is atomic, so the old output or the new one."""
    if before is False:
        return "nothing written"
    now = _identity(path)
    if now == before:
        return f"{path} unchanged" if now else "nothing written"
    return f"{path} was written completely before the interrupt"


def _main(args):
    check_paths(args)

    def log(message):
        print(message, file=sys.stderr, flush=True)

    if args.source == "synthetic":
        if args.preset is None:
            raise DllmError(f"synthetic needs --preset ({', '.join(PRESETS)})")
        if args.format is not None:
            raise DllmError("--format applies to checkpoint files, not to 'synthetic'")
        if args.quant == "keep" or args.output_quant or args.embedding_quant \
                or args.other_quant:
            raise DllmError("synthetic weights take --quant only (they are Q4_0 at source)")
        config, reports = convert_synthetic(args.preset, args.output, args.layers,
                                            args.seed or 0, not args.quiet, log,
                                            args.tokenizer, args.chat_template,
                                            args.quant or "q40")
    else:
        if args.preset is not None or args.layers is not None or args.seed is not None:
            raise DllmError("--preset, --layers and --seed apply to 'synthetic' only")
        config, reports = convert(args.source, args.output, args.quant, args.format,
                                  args.tokenizer, args.chat_template, not args.quiet, log,
                                  args.allow_nonfinite, args.output_quant,
                                  args.embedding_quant, args.other_quant)
    if not args.quiet:
        log(error_table(reports))
    log(f"{PROG}: wrote {args.output} ({config.n_layers} layers, dim {config.dim}, "
        f"vocab {config.vocab_size}, {describe_types({r.name: r.quant for r in reports})})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
