"""python -m dllm.generate: text generation with the model split over the MPI ranks.

    mpirun -np 8 -hostfile hostfiles/pis python -m dllm.generate --model m.h5 --prompt "..."

Root streams the text as it is generated, then prints where the time went. Without --model
the embedded demo model (tinystories-1m, Q40, converted by dllm) is used. With --transcript
root records the prompt, the tokens so far and the sampler's state after every token;
--resume continues such a record after a crash, on any number of ranks (docs/faults.md).
"""
import sys
from pathlib import Path

import numpy as np

from . import demo_model
from .atomic import write_json
from .cli import (ArgumentParser, add_engine_options, add_fault_options, entry, load_model,
                  model_loaded, run, use_fault_options)
from .checks import check_paths, check_utf8, check_values, read_json
from .errors import DllmError, on_one_rank
from .output import root_print
from .sampler import Sampler
from .stats import StepTimer, conditions, summarize

PROG = "dllm.generate"
TRANSCRIPT_KIND, TRANSCRIPT_VERSION = "dllm-transcript", 2
# What a transcript fixes: --resume takes these from it (a flag that contradicts it is an error).
# The parallel mode and the profile decide where the Q8_0 roundings fall, so a pipeline run
# resumed tensor-parallel would give another text.
# So do the kernels: the fast backend's Q8_0 inputs round where the numpy one's do not.
RESUMED = ("prompt", "steps", "temperature", "top_p", "seed", "no_stop", "sync", "sync_scheme",
           "prefill_chunk", "max_seq_len", "parallel", "profile", "kernels")
# Version 1 did not record these: its resume takes them from the command line, as it did.
NOT_IN_VERSION_1 = ("parallel", "profile", "kernels")


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
    comm.from_root(check_paths, args)
    transcript = None
    if args.resume:
        if args.chat:
            raise DllmError("--resume continues a --transcript of plain generation, not --chat")
        transcript = comm.from_root(read_transcript, args.resume, parser)
        apply_transcript(args, transcript, parser)
        args.transcript = args.transcript or args.resume
    if args.chat and args.transcript:
        raise DllmError("--transcript records plain generation; it does not apply to --chat")
    if args.chat and args.stats_json:
        raise DllmError("--stats-json measures plain generation; it does not apply to --chat")
    use_fault_options(comm, args, hint=f"continue with --resume {args.transcript}"
                      if args.transcript else None)
    sampler = Sampler(args.temperature, args.top_p, args.seed)
    model = load_model(comm, args)
    args.kernels = model.kernels.name        # the one that ran, recorded in a transcript
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
        on_one_rank(write_json, args.transcript, transcript)
    root_print(comm, "")
    comm.root_only(warn_if_context_full, model, len(prompt_ids), generated, args.steps,
                   not args.no_stop)

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
            write_json(args.stats_json, report)
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
    on_one_rank(write_json, path, transcript)


def read_transcript(path, parser):
    """Root: a transcript file, checked: its settings as the parser would take them, its
    sampler state one numpy restores."""
    transcript = read_json(path, "--resume transcript")
    if not isinstance(transcript, dict) or transcript.get("kind") != TRANSCRIPT_KIND:
        raise DllmError(f"--resume {path} is not a dllm.generate --transcript file")
    version = transcript.get("version")
    if version not in (1, TRANSCRIPT_VERSION):
        raise DllmError(f"--resume {path} is transcript version {version}; this dllm reads "
                        f"versions 1 and {TRANSCRIPT_VERSION}")
    settings = transcript.get("settings")
    expected = set(RESUMED) - (set(NOT_IN_VERSION_1) if version == 1 else set())
    ids = [transcript.get("prompt_ids"), transcript.get("token_ids")]
    if (not isinstance(settings, dict) or expected - set(settings)
            or not all(isinstance(x, list) and all(isinstance(t, int) for t in x) for x in ids)
            or not isinstance(transcript.get("model"), str)
            or not all(_valid_setting(parser, name, settings[name])
                       for name in RESUMED if name in settings)
            or not _valid_sampler_state(transcript.get("sampler_state"))):
        raise DllmError(f"--resume {path}: the transcript is incomplete or damaged")
    return transcript


def _valid_setting(parser, name, value):
    """True when `value` is one the flag `name` can take once parsed."""
    action = next(a for a in parser._actions if a.dest == name)
    if value is None:
        return action.default is None
    if action.nargs == 0:                      # store_true
        return isinstance(value, bool)
    if action.choices is not None and value not in action.choices:
        return False
    try:
        return action.type(str(value)) == value if action.type else isinstance(value, str)
    except ValueError:
        return False


def _valid_sampler_state(state):
    """None (no token drawn yet), or a state numpy's generator restores."""
    if state is None:
        return True
    try:
        np.random.default_rng().bit_generator.state = state
    except (TypeError, ValueError, KeyError):
        return False
    return True


def apply_transcript(args, transcript, parser):
    """Take the transcript's settings; a flag given with another value is an error. The
    ranges of dllm.checks hold for the recorded values as for flags."""
    for name, recorded in transcript["settings"].items():
        if name not in RESUMED:
            continue
        given = getattr(args, name)
        if given != parser.get_default(name) and given != recorded:
            raise DllmError(f"--resume continues with the transcript's settings: "
                            f"--{name.replace('_', '-')} {given} differs from its {recorded}")
        setattr(args, name, recorded)
    args.model = args.model or transcript["model"]
    check_values(args)


def check_transcript_model(transcript, model):
    if model.config.to_dict() != transcript["config"] or model.quant != transcript["quant"]:
        raise DllmError(f"{model.path} is not the model the transcript was made with "
                        f"({transcript['model']}): its configuration or weights type differ")
    if any(not 0 <= t < model.config.vocab_size
           for t in transcript["prompt_ids"] + transcript["token_ids"]):
        raise DllmError("the transcript holds token ids outside the model's vocabulary")


def warn_if_context_full(model, prompt_len, generated, steps, stop_at_eos):
    """Root: say so on stderr when the context, not --steps or EOS, ended the generation."""
    if len(generated) >= steps or (stop_at_eos and generated
                                   and generated[-1] == model.config.eos_id):
        return
    if prompt_len + len(generated) > model.max_seq_len:   # the last token fills the context
        print(f"{PROG}: warning: stopped after {len(generated)} of {steps} tokens: the "
              f"context of {model.max_seq_len} tokens is full (--max-seq-len, at most the "
              f"model's {model.config.max_seq_len})", file=sys.stderr, flush=True)


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
    template = comm.from_root(_chat_template, model, args.model or demo_model())
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
    try:
        line = _next_line()
    except UnicodeDecodeError as exc:
        raise DllmError(f"--chat: stdin is not UTF-8 text (byte {exc.start} of a line)") from None
    if line is not None:    # a C locale decodes bad bytes to surrogates instead
        check_utf8(line, "--chat: a line of stdin")
    return line


def _next_line():
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
           f"{c['quant']}, {c['kernels']} kernels, {c['threads_per_rank']} thread(s) per rank",
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
