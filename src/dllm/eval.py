"""python -m dllm.eval: MMLU accuracy and perplexity with the model split over the MPI ranks.

    mpirun -np 4 python -m dllm.eval mmlu --model m.h5 --data mmlu/ --out mmlu.json
    mpirun -np 4 python -m dllm.eval perplexity --model m.h5 --text valid.txt --out ppl.json
    python -m dllm.eval compare one-rank.json four-ranks.json

The work is in dllm.evaluate; this module parses flags, prints and shows progress (root only).
Methods and measured results: docs/evaluation.md.
"""
import hashlib
import json
import sys
import time
from pathlib import Path

from . import evaluate
from .mmlu import PROMPT_STYLES
from .cli import (ArgumentParser, add_engine_options, add_fault_options, entry, load_model,
                  model_loaded, run, use_fault_options)
from .checks import check_paths, read_file, read_json
from .errors import DllmError
from .output import root_print
from . import demo_model
from .atomic import write_json
from .stats import conditions

PROG = "dllm.eval"


def build_parser(is_root=True):
    p = ArgumentParser(prog=f"python -m {PROG}", is_root=is_root,
                       description="Evaluate a model split over the MPI ranks.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{mmlu,perplexity,compare}")
    m = sub.add_parser("mmlu", is_root=is_root, help="MMLU accuracy (Hendrycks et al. format)",
                       description="MMLU accuracy: k-shot prompts, choices scored by the "
                                   "log-probability of ' A'..' D' after 'Answer:'.")
    add_model_options(m)
    m.add_argument("--data", required=True,
                   help="MMLU data folder with test/ and dev/ <subject>_{test,dev}.csv")
    m.add_argument("--shots", type=int, default=5,
                   help="dev examples per prompt; fewer when a prompt would not fit the "
                        "context (default 5)")
    m.add_argument("--subjects", nargs="+", default=None, metavar="SUBJECT",
                   help="subjects to run, e.g. abstract_algebra anatomy (default: all)")
    m.add_argument("--limit", type=int, default=None,
                   help="first N test questions of each subject (default: all)")
    m.add_argument("--prompt-style", default="lm-eval", choices=PROMPT_STYLES,
                   help="'lm-eval': lm-evaluation-harness's text (default); 'hendrycks': "
                        "Hendrycks' evaluate.py exactly (two spaces after 'about', the "
                        "questions unstripped); see docs/evaluation.md")
    m.add_argument("--out", default=None, metavar="PATH",
                   help="results JSON, checkpointed every 30 s and after every subject; an "
                        "existing file of the same settings is continued, never overwritten")
    q = sub.add_parser("perplexity", is_root=is_root, help="perplexity of a text file",
                       description="Perplexity of a text: " + evaluate.PERPLEXITY_METHOD + ".")
    add_model_options(q)
    q.add_argument("--text", required=True, help="UTF-8 text file")
    q.add_argument("--window", type=int, default=None,
                   help="tokens per forward pass including BOS (default: the model's context)")
    q.add_argument("--limit", type=int, default=None, metavar="N",
                   help="score only the first N windows of the text (default: all)")
    q.add_argument("--out", default=None, metavar="PATH",
                   help="result JSON, checkpointed every 30 s; an existing file of the same "
                        "settings is continued (or, finished, shown), never overwritten")
    c = sub.add_parser("compare", is_root=is_root, help="compare result files",
                       description="Compare two MMLU (or two perplexity) result files; with "
                                   "more than one B, the factor table: per B, the settings "
                                   "that differ from A, the answers that flip and McNemar's "
                                   "test.")
    c.add_argument("a", help="results JSON of run A (the baseline)")
    c.add_argument("b", nargs="+", help="results JSON of run B (or several: one factor each)")
    c.add_argument("--top", type=int, default=10, help="subjects to list (default 10)")
    c.add_argument("--out", default=None, metavar="PATH",
                   help="write the comparison as JSON (never over a results file)")
    return p


def add_model_options(p):
    add_engine_options(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--checkpoint-every", type=float, default=evaluate.CHECKPOINT_SECONDS,
                   metavar="SECONDS",
                   help="with --out: write the work done at least this often (default "
                        f"{evaluate.CHECKPOINT_SECONDS:g}; 0 = after every question or window)")
    add_fault_options(p)


def main(argv=None):
    return run(_main, argv, PROG)


def _main(comm, argv):
    args = build_parser(comm.is_root).parse_args(argv)
    comm.from_root(check_paths, args)
    return {"mmlu": _mmlu, "perplexity": _perplexity, "compare": _compare}[args.command](
        comm, args)


def _watch(comm, args):
    """The watchdog's limits, and how to continue after it aborts (docs/faults.md)."""
    use_fault_options(comm, args, hint=f"run the same command again to continue {args.out}"
                      if args.out else "give --out to make the run resumable")


def _load(comm, args):
    model = load_model(comm, args)
    model_loaded(comm)
    return model


def _expected_settings(comm, args):
    """Root, before loading: the run settings the loaded model will report (run_settings)
    and its context, from the flags and the model file's header, so that an --out of other
    settings is refused before minutes go into loading a large model."""
    from .modelfile import ModelFile
    path = args.model or demo_model()
    with ModelFile(path) as mf:
        quant, context = mf.quant, args.max_seq_len or mf.config.max_seq_len
    # A pipeline model reports its scheme as "pipeline" (dllm.pipeline.PipelineModel.scheme).
    scheme = "pipeline" if args.parallel == "pipeline" else args.sync_scheme
    run = evaluate.run_settings(path=path, quant=quant, sync=args.sync, sync_scheme=scheme,
                                world_size=comm.size, prefill_chunk=args.prefill_chunk)
    return run, context


# --- mmlu -----------------------------------------------------------------------------------
def _mmlu(comm, args):
    _watch(comm, args)
    subjects = comm.from_root(_check_data, args.data, args.subjects, args.shots)
    if args.out:
        comm.from_root(_check_mmlu_out, comm, args)
    model = _load(comm, args)
    info = conditions(comm, model, command="mmlu", data=str(args.data))
    progress = Progress(comm.is_root and not args.no_progress, "questions")
    results = evaluate.run_mmlu(model, args.data, subjects, args.shots, args.limit, args.out,
                                info, progress, checkpoint_every=args.checkpoint_every,
                                prompt_style=args.prompt_style)
    progress.close()
    if comm.is_root:
        print_mmlu(results, subjects)
    return 0


def _check_mmlu_out(comm, args):
    """Root, before loading (check_paths found --out writable): --out is empty, or results
    of these settings."""
    if Path(args.out).exists():
        run, context = _expected_settings(comm, args)
        evaluate.load_results(args.out, evaluate.mmlu_settings(
            None, args.shots, args.limit, run=run, max_seq_len=context,
            prompt_style=args.prompt_style))


def _check_data(data, requested, shots):
    """Fail before loading the model: the folder, the subjects and their dev examples."""
    subjects = evaluate.select_subjects(evaluate.list_subjects(data), requested)
    for subject in subjects:
        evaluate.read_subject(data, subject, shots, limit=0)
    return subjects


def print_mmlu(results, subjects):
    s = results["settings"]
    print(f"MMLU {s['split']}, {s['shots']}-shot, {s['model']} ({s['quant']} weights), "
          f"{s['world_size']} rank(s), sync {s['sync']}, prompt style "
          f"{s.get('prompt_style', 'lm-eval')}")
    print(f"{'subject':40s} {'n':>5s} {'accuracy':>9s} {'shots':>6s} {'cut':>4s}")
    for name, r in results["subjects"].items():
        mark = "" if name in subjects else " (earlier run)"
        shots = sum(int(k) * v for k, v in r["shots_used"].items()) / max(r["n"], 1)
        print(f"{name:40s} {r['n']:5d} {_pct(r['accuracy']):>9s} {shots:6.2f} "
              f"{r['truncated']:4d}{mark}")
    print(f"micro average {_pct(results['micro_avg'])} over {results['n_questions']} questions,"
          f" macro average {_pct(results['macro_avg'])} over {results['n_subjects']} subjects")
    for category, c in results.get("categories", {}).items():
        print(f"  {category:38s} {c['n']:5d} {_pct(c['accuracy']):>9s}")


def _pct(value):
    return "-" if value is None else f"{100 * value:.2f}%"


# --- perplexity -------------------------------------------------------------------------------
def _perplexity(comm, args):
    _watch(comm, args)
    about = comm.from_root(_about_text, args.text, args.tokenizer)   # fails before loading
    if args.limit is not None:
        about["limit_windows"] = args.limit
    run, context = comm.from_root(_expected_settings, comm, args)
    window = context if args.window is None else args.window
    evaluate.check_window(window, context)
    if args.out:
        finished = comm.from_root(_check_perplexity_out, args.out,
                                  evaluate.perplexity_settings(run, window, about))
        if finished:
            root_print(comm, f"{_perplexity_line(finished)}  (already in {args.out}, not "
                             f"recomputed)")
            return 0
    model = _load(comm, args)
    ids = comm.root_only(_encode_text, model, args.text)
    if args.limit is not None and ids is not None:
        ids = ids[:args.limit * (window - 1)]    # the first N windows (window - 1 ids each)
    info = conditions(comm, model, command="perplexity", text=str(args.text))
    progress = Progress(comm.is_root and not args.no_progress, "windows")
    result = evaluate.perplexity(model, ids, window, progress, out=args.out, about=about,
                                 conditions=info, checkpoint_every=args.checkpoint_every)
    progress.close()
    if comm.is_root:
        print(_perplexity_line(result))
    return 0


def _perplexity_line(r):
    speed = f", {r['tokens_per_s']:.0f} tokens/s" if r.get("tokens_per_s") else ""
    return (f"perplexity {r['perplexity']:.4f}  mean NLL {r['mean_nll']:.5f}  tokens scored "
            f"{r['tokens_scored']}  {r['windows']} windows of {r['window']} tokens  "
            f"({r['seconds']:.1f} s{speed})")


def _about_text(text, tokenizer):
    """The text's part of the perplexity settings: name, SHA-256, the tokenizer override."""
    read_file(text, "text file")      # UTF-8 text, or one line naming it
    return {"text": Path(text).name,
            "text_sha256": hashlib.sha256(read_file(text, "text file", text=False)).hexdigest(),
            "tokenizer": Path(tokenizer).name if tokenizer else None}


def _check_perplexity_out(out, settings):
    """Root, before loading (check_paths found --out writable): --out is empty, or
    perplexity of these settings (returned when finished)."""
    state = evaluate.load_perplexity(out, settings)
    return state if state and "perplexity" in state else None


def _encode_text(model, path):
    if model.tokenizer is None:
        raise DllmError("this model file has no tokenizer: pass --tokenizer PATH "
                        "(a SentencePiece tokenizer.model)")
    return model.tokenizer.encode(read_file(path, "text file"), bos=False)


# --- compare ----------------------------------------------------------------------------------
def _compare(comm, args):
    if args.out:
        comm.from_root(_check_compare_out, args.out)
    if len(args.b) > 1:
        report = comm.from_root(_factor_table, args.a, args.b)
        text = format_factors(report)
    else:
        report = comm.from_root(_compare_files, args.a, args.b[0], args.top)
        text = format_comparison(report, args.a, args.b[0])
    if comm.is_root:
        print(text)
        if args.out:
            write_json(args.out, report)
    return 0


def _factor_table(path_a, paths_b):
    """Each B against A: what differs, the flips and McNemar's test (MMLU files only)."""
    rows = []
    for path_b in paths_b:
        r = _compare_files(path_a, path_b, top=1)
        if r["kind"] != "mmlu":
            raise DllmError("the factor table (several B files) compares MMLU results")
        rows.append({"b": path_b, "factor": r["settings_differ"], "questions": r["questions"],
                     "accuracy_a": r["accuracy_a"], "accuracy_b": r["accuracy_b"],
                     "right_to_wrong": r["only_a_correct"], "wrong_to_right": r["only_b_correct"],
                     "letter_changed": round((1 - r["agreement"]) * r["questions"]),
                     "mcnemar_p": r["mcnemar_p"],
                     "logprob_max_abs_diff": r["logprob_max_abs_diff"]})
    return {"kind": "mmlu-factors", "a": path_a, "rows": rows}


def format_factors(report):
    out = [f"A = {report['a']}",
           f"{'B: settings that differ from A':58s} {'n':>5s} {'acc A':>7s} {'acc B':>7s} "
           f"{'letters':>7s} {'R->W':>5s} {'W->R':>5s} {'McNemar p':>9s} {'max dlogp':>9s}"]
    for r in report["rows"]:
        differ = ", ".join(f"{k} {x}->{y}" for k, (x, y) in r["factor"].items()) or "(none)"
        out.append(f"{differ[:58]:58s} {r['questions']:5d} {_pct(r['accuracy_a']):>7s} "
                   f"{_pct(r['accuracy_b']):>7s} {r['letter_changed']:7d} "
                   f"{r['right_to_wrong']:5d} {r['wrong_to_right']:5d} {r['mcnemar_p']:9.3g} "
                   f"{r['logprob_max_abs_diff']:9.2g}")
    return "\n".join(out)


def _check_compare_out(out):
    """A comparison never replaces a results file (say, one of the two compared)."""
    try:
        kind = evaluate.results_kind(json.loads(Path(out).read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return
    if kind:
        raise DllmError(f"--out {out} holds {'MMLU' if kind == 'mmlu' else kind} results; "
                        f"refusing to overwrite it with a comparison: choose another --out")


def _compare_files(path_a, path_b, top):
    a, b = read_json(path_a, "results file"), read_json(path_b, "results file")
    kind_a, kind_b = evaluate.check_results(a, path_a), evaluate.check_results(b, path_b)
    if kind_a != kind_b:
        raise DllmError(f"{path_a} holds {kind_a} results and {path_b} {kind_b} results: "
                        f"compare two MMLU or two perplexity results files")
    if kind_a == "mmlu":
        return {"kind": "mmlu", **evaluate.compare_mmlu(a, b, top)}
    return {"kind": "perplexity", **evaluate.compare_perplexity(a, b)}


def format_comparison(r, name_a, name_b):
    out = [f"A = {name_a}", f"B = {name_b}"]
    for key, (x, y) in r["settings_differ"].items():
        out.append(f"  setting {key}: A {x}, B {y}")
    if r["kind"] == "perplexity":
        out.append(f"perplexity A {r['perplexity_a']:.4f}, B {r['perplexity_b']:.4f}: "
                   f"B - A = {r['difference']:+.4f} ({100 * r['relative']:+.3f}%)")
        return "\n".join(out)
    ci = "n/a" if r["ci95"] is None else "[{:+.2f}, {:+.2f}]".format(*(100 * x for x in r["ci95"]))
    out += [f"questions in both: {r['questions']} (only in A {r['only_in_a']}, only in B "
            f"{r['only_in_b']})",
            f"accuracy A {_pct(r['accuracy_a'])}, B {_pct(r['accuracy_b'])}: B - A = "
            f"{100 * r['difference']:+.2f} points, 95% CI {ci} (paired, per question)",
            f"both right {r['both_correct']}, only A {r['only_a_correct']}, only B "
            f"{r['only_b_correct']}, both wrong {r['both_wrong']}; McNemar exact p = "
            f"{r['mcnemar_p']:.3g}",
            f"same predicted letter: {100 * r['agreement']:.2f}% of questions; largest "
            f"log-probability change {r['logprob_max_abs_diff']:.3g} "
            f"(relative {r['logprob_max_rel_diff']:.3g})",
            f"{'largest per-subject changes':40s} {'n':>5s} {'A':>8s} {'B':>8s} {'B - A':>8s}"]
    for s in r["subjects"]:
        out.append(f"{s['subject']:40s} {s['n']:5d} {_pct(s['accuracy_a']):>8s} "
                   f"{_pct(s['accuracy_b']):>8s} {100 * s['change']:+7.2f}")
    return "\n".join(out)


# --- progress (root only, stderr) ---------------------------------------------------------------
LOG_EVERY = 20.0   # seconds between progress lines when stderr is not a terminal


class Progress:
    """Progress on stderr: done/total, the rate and an ETA. On a terminal a bar redrawn in
    place at most 5 times a second; otherwise (a log file, or any rank under mpirun, whose
    launcher forwards output through pipes) a line every `every` seconds and one as each
    subject ends. clock: seconds, monotonic (tests pass a fake one)."""

    def __init__(self, enabled, unit, stream=None, every=LOG_EVERY, clock=time.perf_counter):
        self.enabled, self.unit, self.every, self.clock = enabled, unit, every, clock
        self.stream = stream or sys.stderr
        self.tty = enabled and self.stream.isatty()
        self.total = self.done = 0
        self.label, self.drawn = None, 0.0

    def start(self, total, note=None):
        """total: steps this run will make. note: what an earlier run already did."""
        self.total, self.done = total, 0
        self.started = self.drawn = self.clock()
        if self.enabled and note:
            print(f"{PROG}: continuing: {note}", file=self.stream, flush=True)

    def step(self, label):
        if not self.enabled:
            return
        if label != self.label and self.label is not None and not self.tty:
            self._line()   # the subject before has ended
        self.label = label
        self.done += 1
        now = self.clock()
        if self.tty and (now - self.drawn > 0.2 or self.done == self.total):
            self.drawn = now
            width = 24
            filled = int(width * self.done / max(self.total, 1))
            print(f"\r[{'#' * filled}{'.' * (width - filled)}] {self._status()}\033[K",
                  end="", file=self.stream, flush=True)
        elif not self.tty and now - self.drawn >= self.every:
            self._line()

    def _status(self):
        seconds = self.clock() - self.started
        rate = self.done / seconds if seconds > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        return (f"{self.done}/{self.total} {self.unit}  {rate:.2f} {self.unit}/s  "
                f"ETA {_clock(eta)}  {self.label}")

    def _line(self):
        self.drawn = self.clock()
        print(f"{PROG}: {self._status()}", file=self.stream, flush=True)

    def close(self):
        if not self.enabled or not self.done:
            return
        if self.tty:
            print(file=self.stream, flush=True)
        else:
            self._line()


def _clock(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


if __name__ == "__main__":
    entry(_main, PROG)
