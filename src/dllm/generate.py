"""python -m dllm.generate: text generation with the model split over the MPI ranks.

    mpirun -np 8 -hostfile hostfiles/pis python -m dllm.generate --model m.h5 --prompt "..."

Root streams the text as it is generated, then prints where the time went. Without --model
the embedded demo model (tinystories-1m, Q40, converted by dllm) is used. With --transcript
root records the prompt, the tokens so far and the sampler's state after every token;
--resume continues such a record after a crash, on any number of ranks (docs/faults.md).
"""
import json
import os
import sys
from importlib import resources
from pathlib import Path

from .cli import (ArgumentParser, add_engine_options, add_fault_options, entry, load_model,
                  model_loaded, root_print, run, use_fault_options)
from .errors import DllmError
from .sampler import Sampler
from .stats import StepTimer, conditions, summarize, write_json_atomically

PROG = "dllm.generate"
TRANSCRIPT_KIND, TRANSCRIPT_VERSION = "dllm-transcript", 1
# What a transcript fixes: --resume takes these from it (a flag that contradicts it is an error).
RESUMED = ("prompt", "steps", "temperature", "top_p", "seed", "no_stop", "sync", "sync_scheme",
           "prefill_chunk", "max_seq_len")


def default_model():
    """The demo model shipped inside the package."""
    return Path(str(resources.files("dllm") / "data" / "tinystories-1m-q40.h5"))


def build_parser(is_root=True):
    p = ArgumentParser(prog=f"python -m {PROG}", is_root=is_root,
                       description="Generate text with a model split over the MPI ranks.")
    add_engine_options(p)
    p.add_argument("--prompt", default="", help="text to continue (default: start from BOS)")
    p.add_argument("--steps", type=int, default=128, help="new tokens to generate (default 128)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature; 0 = greedy (default 0)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling mass in (0, 1]; 1 = off (default 1)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--no-stop", action="store_true", help="do not stop at the EOS token")
    p.add_argument("--stats-json", default=None, metavar="PATH",
                   help="write the run's figures and conditions as JSON")
    p.add_argument("--quiet", action="store_true", help="print only the generated text")
    p.add_argument("--chat", action="store_true",
                   help="chat in the model's stored chat template (llama2 or llama3): one "
                        "reply to --prompt, or turns read from stdin, one per line, until EOF")
    p.add_argument("--system", default=None, help="--chat: system prompt")
    p.add_argument("--transcript", default=None, metavar="PATH",
                   help="record the prompt, the tokens so far and the sampler's state after "
                        "every token (JSON, written atomically), for --resume")
    p.add_argument("--resume", default=None, metavar="PATH",
                   help="continue the generation a --transcript recorded (any number of "
                        "ranks; the settings are the transcript's); it goes on recording there")
    add_fault_options(p)
    return p


def main(argv=None):
    return run(_main, argv, PROG)


def _main(comm, argv):
    from .model import generate_tokens
    parser = build_parser(comm.is_root)
    args = parser.parse_args(argv)
    transcript = None
    if args.resume:
        if args.chat:
            raise DllmError("--resume continues a --transcript of plain generation, not --chat")
        transcript = comm.from_root(read_transcript, args.resume)
        apply_transcript(args, transcript, parser)
        args.transcript = args.transcript or args.resume
    if args.chat and args.transcript:
        raise DllmError("--transcript records plain generation; it does not apply to --chat")
    use_fault_options(comm, args, hint=f"continue with --resume {args.transcript}"
                      if args.transcript else None)
    if args.steps < 1:
        raise DllmError(f"--steps must be at least 1, got {args.steps}")
    sampler = Sampler(args.temperature, args.top_p, args.seed)
    for path in (args.stats_json, args.transcript if not args.resume else None):
        if path:
            comm.from_root(check_writable, path)
    model = load_model(comm, args)
    if args.chat:
        model_loaded(comm)
        return chat(comm, model, args, sampler)
    if transcript is None:
        prompt_ids = comm.from_root(_encode, model, args.prompt)
        done = []
        if args.transcript:
            transcript = comm.root_only(new_transcript, args, model, prompt_ids)
    else:
        comm.from_root(check_transcript_model, transcript, model)
        prompt_ids, done = comm.bcast((transcript["prompt_ids"], transcript["token_ids"])
                                      if comm.is_root else None)
        if comm.is_root and transcript["sampler_state"] is not None:
            sampler.rng.bit_generator.state = transcript["sampler_state"]

    stream = comm.root_only(_text_stream, model, prompt_ids)
    if stream is not None:
        root_print(comm, stream.printed, end="")
        root_print(comm, "".join(stream.push(token) for token in done), end="")
    comm.barrier()  # start the clock together
    timer = StepTimer(comm)
    generated = list(done)
    for token in generate_tokens(model, prompt_ids, done, args.steps, sampler,
                                 stop_at_eos=not args.no_stop):
        if len(generated) > len(done):
            timer.lap("decode")
        else:   # the first token comes out of the prefill of the prompt (and the replay)
            timer.lap("prefill", tokens=len(prompt_ids) + len(done))
            model_loaded(comm)
        generated.append(token)
        if stream is not None:
            root_print(comm, stream.push(token), end="")
        if transcript is not None and comm.is_root:
            record_token(args.transcript, transcript, token, sampler, stream)
        timer.mark()
    if transcript is not None and comm.is_root:
        transcript["finished"] = True
        write_json_atomically(args.transcript, transcript)
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


# --- transcripts: resumable generation -----------------------------------------------------
def new_transcript(args, model, prompt_ids):
    """Root: the record of a new run (written at its first token)."""
    return {"kind": TRANSCRIPT_KIND, "version": TRANSCRIPT_VERSION,
            "model": str(Path(model.path).resolve()), "config": model.config.to_dict(),
            "quant": model.quant, "prompt_ids": list(prompt_ids),
            "settings": {name: getattr(args, name) for name in RESUMED},
            "token_ids": [], "text": None, "sampler_state": None, "finished": False}


def record_token(path, transcript, token, sampler, stream):
    """Root: add a token and the sampler's state after drawing it, and write the whole
    record atomically (a crash leaves the previous token's record, never half a file)."""
    transcript["token_ids"].append(int(token))
    transcript["sampler_state"] = sampler.rng.bit_generator.state
    transcript["text"] = stream.printed if stream is not None else None
    write_json_atomically(path, transcript)


def read_transcript(path):
    """Root: a transcript file, checked."""
    try:
        with open(path, encoding="utf-8") as f:
            transcript = json.load(f)
    except FileNotFoundError:
        raise DllmError(f"--resume {path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise DllmError(f"--resume {path} cannot be read as a transcript ({exc})") from None
    if not isinstance(transcript, dict) or transcript.get("kind") != TRANSCRIPT_KIND:
        raise DllmError(f"--resume {path} is not a dllm.generate --transcript file")
    if transcript.get("version") != TRANSCRIPT_VERSION:
        raise DllmError(f"--resume {path} is transcript version {transcript.get('version')}; "
                        f"this dllm reads version {TRANSCRIPT_VERSION}")
    settings = transcript.get("settings")
    ids = [transcript.get("prompt_ids"), transcript.get("token_ids")]
    if (not isinstance(settings, dict) or set(RESUMED) - set(settings)
            or not all(isinstance(x, list) and all(isinstance(t, int) for t in x) for x in ids)
            or not isinstance(transcript.get("model"), str)):
        raise DllmError(f"--resume {path}: the transcript is incomplete or damaged")
    return transcript


def apply_transcript(args, transcript, parser):
    """Take the transcript's settings; a flag given with another value is an error."""
    for name, recorded in transcript["settings"].items():
        given = getattr(args, name)
        if given != parser.get_default(name) and given != recorded:
            raise DllmError(f"--resume continues with the transcript's settings: "
                            f"--{name.replace('_', '-')} {given} differs from its {recorded}")
        setattr(args, name, recorded)
    args.model = args.model or transcript["model"]


def check_transcript_model(transcript, model):
    if model.config.to_dict() != transcript["config"] or model.quant != transcript["quant"]:
        raise DllmError(f"{model.path} is not the model the transcript was made with "
                        f"({transcript['model']}): its configuration or weights type differ")
    if any(not 0 <= t < model.config.vocab_size
           for t in transcript["prompt_ids"] + transcript["token_ids"]):
        raise DllmError("the transcript holds token ids outside the model's vocabulary")


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
        with comm.unbounded():     # a person may take their time to type
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
    layout = ("pipeline" if c["sync_scheme"] == "pipeline"
              else f"tensor-parallel ({c['sync_scheme']})")
    out = [f"--- {PROG}: {c['world_size']} rank(s) {layout}, sync {c['sync']}, weights "
           f"{c['quant']}, {c['threads_per_rank']} thread(s) per rank",
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
