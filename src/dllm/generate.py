"""python -m dllm.generate: text generation with the model split over the MPI ranks.

    mpirun -np 8 -hostfile hostfiles/pis python -m dllm.generate --model m.h5 --prompt "..."

Root streams the text as it is generated, then prints where the time went. Without --model
the embedded demo model (tinystories-1m, Q40, converted by dllm) is used.
"""
import os
import sys
from importlib import resources
from pathlib import Path

from .cli import ArgumentParser, entry, root_print, run
from .errors import DllmError
from .sampler import Sampler
from .stats import StepTimer, conditions, summarize, write_json_atomically

PROG = "dllm.generate"


def default_model():
    """The demo model shipped inside the package."""
    return Path(str(resources.files("dllm") / "data" / "tinystories-1m-q40.h5"))


def build_parser(is_root=True):
    p = ArgumentParser(prog=f"python -m {PROG}", is_root=is_root,
                       description="Generate text with a model split over the MPI ranks.")
    p.add_argument("--model", default=None,
                   help="dllm HDF5 model file (default: the embedded tinystories-1m demo)")
    p.add_argument("--prompt", default="", help="text to continue (default: start from BOS)")
    p.add_argument("--steps", type=int, default=128, help="new tokens to generate (default 128)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature; 0 = greedy (default 0)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling mass in (0, 1]; 1 = off (default 1)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--sync", default="q80", choices=("q80", "f32"),
                   help="activation payload between ranks (default q80)")
    p.add_argument("--sync-scheme", default="slices", choices=("slices", "partials", "reduce"),
                   help="how ranks combine matmul outputs: Allgather output slices (default), "
                        "Allgather row-parallel partial sums, or reduce-scatter + Allgather")
    p.add_argument("--parallel", default="tensor", choices=("tensor", "pipeline"),
                   help="'tensor': every rank a slice of every matrix (default); 'pipeline': "
                        "every rank whole layers, activations passed rank to rank")
    p.add_argument("--profile", default=None, metavar="PATH",
                   help="device profile (JSON, docs/parallelism.md): layers by speed within "
                        "memory (pipeline), uneven slices by speed (tensor)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="context to allocate, at most the model's (default: the model's)")
    p.add_argument("--weights-from", default="file", choices=("file", "root"),
                   help="'file': every rank reads its slices from the model file (shared "
                        "filesystem); 'root': root reads and sends them (default file)")
    p.add_argument("--tokenizer", default=None,
                   help="SentencePiece tokenizer.model overriding the embedded one")
    p.add_argument("--prefill-chunk", type=int, default=64,
                   help="prompt tokens per forward pass while prefilling (default 64)")
    p.add_argument("--no-stop", action="store_true", help="do not stop at the EOS token")
    p.add_argument("--stats-json", default=None, metavar="PATH",
                   help="write the run's figures and conditions as JSON")
    p.add_argument("--quiet", action="store_true", help="print only the generated text")
    p.add_argument("--chat", action="store_true",
                   help="chat in the model's stored chat template (llama2 or llama3): one "
                        "reply to --prompt, or turns read from stdin, one per line, until EOF")
    p.add_argument("--system", default=None, help="--chat: system prompt")
    return p


def main(argv=None):
    return run(_main, argv, PROG)


def _main(comm, argv):
    from .loading import load
    args = build_parser(comm.is_root).parse_args(argv)
    if args.steps < 1:
        raise DllmError(f"--steps must be at least 1, got {args.steps}")
    sampler = Sampler(args.temperature, args.top_p, args.seed)
    if args.stats_json:
        comm.from_root(check_writable, args.stats_json)
    model = load(args.model or default_model(), comm, sync=args.sync,
                 max_seq_len=args.max_seq_len, weights_from=args.weights_from,
                 tokenizer=args.tokenizer, prefill_chunk=args.prefill_chunk,
                 sync_scheme=args.sync_scheme, parallel=args.parallel, profile=args.profile)
    if args.chat:
        return chat(comm, model, args, sampler)
    prompt_ids = comm.from_root(_encode, model, args.prompt)

    stream = comm.root_only(_text_stream, model, prompt_ids)
    if stream is not None:
        root_print(comm, stream.printed, end="")
    comm.barrier()  # start the clock together
    timer = StepTimer(comm)
    generated = []
    for token in model.generate(prompt_ids, args.steps, sampler, stop_at_eos=not args.no_stop):
        if generated:
            timer.lap("decode")
        else:   # the first token comes out of the prefill of the whole prompt
            timer.lap("prefill", tokens=len(prompt_ids))
        generated.append(token)
        if stream is not None:
            root_print(comm, stream.push(token), end="")
        timer.mark()
    root_print(comm, "")

    summary = summarize(comm, timer)
    info = conditions(comm, model, weights_from=args.weights_from, temperature=args.temperature,
                      top_p=args.top_p, seed=args.seed, steps=args.steps)
    if comm.is_root:
        summary["prompt_tokens"] = len(prompt_ids)
        report = {**summary, "conditions": info, "prompt": args.prompt,
                  "token_ids": generated, "text": stream.printed if stream else None}
        if not args.quiet:
            print_summary(report, file=sys.stderr)
        if args.stats_json:
            write_json_atomically(args.stats_json, report)
    return 0


def check_writable(path):
    """Fail before the run, not after it, when the JSON cannot be written."""
    if Path(path).is_dir():
        raise DllmError(f"cannot write {path}: it is a directory; give a file name")
    folder = Path(path).resolve().parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise DllmError(f"cannot write {path}: {folder} is not a writable directory")


def _encode(model, prompt):
    if model.tokenizer is None:
        raise DllmError("this model file has no tokenizer: pass --tokenizer PATH "
                        "(a SentencePiece tokenizer.model)")
    return model.tokenizer.encode(prompt, bos=True)


def _text_stream(model, prompt_ids):
    from .tokenizer import TextStream
    return TextStream(model.tokenizer, prompt_ids)


def chat(comm, model, args, sampler):
    """--chat: a conversation in the chat template stored with the model's tokenizer.

    Root reads the user's turns (the --prompt, else stdin lines), formats the whole
    conversation (dllm.tokenizer.chat_prompt_ids) and streams the reply; every rank runs the
    forward passes and stops at the same end-of-turn token, which root broadcasts."""
    from .tokenizer import chat_stop_ids
    template = comm.from_root(_chat_template, model, args.model or default_model())
    stops = comm.from_root(lambda: chat_stop_ids(model.tokenizer, template))
    messages = [("system", args.system)] if args.system else []   # used on root only
    while True:
        user = args.prompt if args.prompt else comm.from_root(_read_turn)
        if user is None:
            return 0
        ids = comm.root_only(_chat_ids, model.tokenizer, template, messages, user)
        stream = comm.root_only(_text_stream, model, [])
        reply = []
        for token in model.generate(ids, args.steps, sampler, stop_at_eos=False):
            if token in stops:
                break
            reply.append(token)
            if stream is not None:
                root_print(comm, stream.push(token), end="")
        root_print(comm, "")
        if comm.is_root:
            messages.append(("assistant", model.tokenizer.decode(reply)))
        if args.prompt:
            return 0


def _chat_template(model, path):
    from .modelfile import ModelFile
    if model.tokenizer is None:
        raise DllmError("this model file has no tokenizer: --chat needs one (--tokenizer PATH)")
    with ModelFile(path) as mf:
        template = mf.chat_template()
    if template is None:
        raise DllmError(f"{path} has no chat template: reconvert it with python -m "
                        f"dllm.convert ... --chat-template llama2|llama3")
    return template


def _chat_ids(tokenizer, template, messages, user):
    from .tokenizer import chat_prompt_ids
    messages.append(("user", user))
    return chat_prompt_ids(tokenizer, template, messages)


def _read_turn():
    """The user's next non-empty line (a '> ' prompt on a terminal), or None at the end."""
    while True:
        if sys.stdin.isatty():
            try:
                line = input("> ")
            except EOFError:
                return None
        else:
            line = sys.stdin.readline()
            if not line:
                return None
        if line.strip():
            return line.rstrip("\n")


def print_summary(r, file):
    c = r["conditions"]
    out = [f"--- {PROG}: {c['world_size']} rank(s), sync {c['sync']}, weights {c['quant']}, "
           f"{c['threads_per_rank']} thread(s) per rank",
           f"prompt tokens     {r['prompt_tokens']:6d}   prefill "
           f"{_rate(r['prefill_tokens_per_s'])} tokens/s",
           f"generated tokens  {r['generated_tokens']:6d}   decode  "
           f"{_rate(r['decode_tokens_per_s'])} tokens/s"]
    if "ms_per_token" in r:
        o = r["over_ranks"]
        out.append("per decoded token        min    median       max  (over ranks)")
        for key in ("total", "inference", "sync"):
            s = o[f"{key}_ms"]
            out.append(f"  {key + ' ms':15s} {s['min']:9.3f} {s['median']:9.3f} {s['max']:9.3f}")
        for key in ("sent", "received"):
            s = o[f"bytes_{key}"]
            out.append(f"  {'bytes ' + key:15s} {s['min']:9.0f} {s['median']:9.0f} {s['max']:9.0f}")
    print("\n".join(out), file=file, flush=True)


def _rate(value):
    return f"{value:9.1f}" if value is not None else "        -"


if __name__ == "__main__":
    entry(_main, PROG)
