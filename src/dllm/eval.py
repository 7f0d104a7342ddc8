"""python -m dllm.eval: MMLU accuracy and perplexity with the model split over the MPI ranks.

    mpirun -np 4 python -m dllm.eval mmlu --model m.h5 --data mmlu/ --out mmlu.json
    mpirun -np 4 python -m dllm.eval perplexity --model m.h5 --text valid.txt --out ppl.json
    python -m dllm.eval compare one-rank.json four-ranks.json

The work is in dllm.evaluate; this module parses flags, prints and shows progress (root only).
Methods and measured results: docs/evaluation.md.
"""
import json
import sys
import time
from pathlib import Path

from . import evaluate
from .cli import ArgumentParser, entry, run
from .errors import DllmError
from .generate import check_writable, default_model
from .stats import conditions, write_json_atomically

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
    m.add_argument("--out", default=None, metavar="PATH",
                   help="results JSON, rewritten after every subject; an existing file of "
                        "the same settings is continued, never overwritten")
    q = sub.add_parser("perplexity", is_root=is_root, help="perplexity of a text file",
                       description="Perplexity of a text: " + evaluate.PERPLEXITY_METHOD + ".")
    add_model_options(q)
    q.add_argument("--text", required=True, help="UTF-8 text file")
    q.add_argument("--window", type=int, default=None,
                   help="tokens per forward pass including BOS (default: the model's context)")
    q.add_argument("--out", default=None, metavar="PATH", help="write the result as JSON")
    c = sub.add_parser("compare", is_root=is_root, help="compare two result files",
                       description="Compare two MMLU (or two perplexity) result files.")
    c.add_argument("a", help="results JSON of run A (the baseline)")
    c.add_argument("b", help="results JSON of run B")
    c.add_argument("--top", type=int, default=10, help="subjects to list (default 10)")
    c.add_argument("--out", default=None, metavar="PATH", help="write the comparison as JSON")
    return p


def add_model_options(p):
    p.add_argument("--model", default=None,
                   help="dllm HDF5 model file (default: the embedded tinystories-1m demo)")
    p.add_argument("--sync", default="q80", choices=("q80", "f32"),
                   help="activation payload between ranks (default q80)")
    p.add_argument("--sync-scheme", default="slices", choices=("slices", "partials", "reduce"),
                   help="how ranks combine matmul outputs (default slices)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="context to allocate, at most the model's (default: the model's)")
    p.add_argument("--weights-from", default="file", choices=("file", "root"),
                   help="'file': every rank reads its slices; 'root': root sends them")
    p.add_argument("--tokenizer", default=None,
                   help="SentencePiece tokenizer.model overriding the embedded one")
    p.add_argument("--prefill-chunk", type=int, default=64,
                   help="prompt tokens per forward pass (default 64)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def main(argv=None):
    return run(_main, argv, PROG)


def _main(comm, argv):
    args = build_parser(comm.is_root).parse_args(argv)
    return {"mmlu": _mmlu, "perplexity": _perplexity, "compare": _compare}[args.command](
        comm, args)


def _load(comm, args):
    from .loading import load
    return load(args.model or default_model(), comm, sync=args.sync,
                max_seq_len=args.max_seq_len, weights_from=args.weights_from,
                tokenizer=args.tokenizer, prefill_chunk=args.prefill_chunk,
                sync_scheme=args.sync_scheme)


# --- mmlu -----------------------------------------------------------------------------------
def _mmlu(comm, args):
    if args.shots < 0:
        raise DllmError(f"--shots must be 0 or more, got {args.shots}")
    if args.limit is not None and args.limit < 1:
        raise DllmError(f"--limit must be at least 1, got {args.limit}")
    subjects = comm.from_root(_check_data, args.data, args.subjects, args.shots)
    if args.out:
        comm.from_root(check_writable, args.out)
    model = _load(comm, args)
    info = conditions(comm, model, command="mmlu", data=str(args.data))
    progress = Progress(comm.is_root and not args.no_progress, "questions")
    results = evaluate.run_mmlu(model, args.data, subjects, args.shots, args.limit, args.out,
                                info, progress)
    progress.close()
    if comm.is_root:
        print_mmlu(results, subjects)
    return 0


def _check_data(data, requested, shots):
    """Fail before loading the model: the folder, the subjects and their dev examples."""
    subjects = evaluate.select_subjects(evaluate.list_subjects(data), requested)
    for subject in subjects:
        evaluate.read_subject(data, subject, shots, limit=0)
    return subjects


def print_mmlu(results, subjects):
    s = results["settings"]
    print(f"MMLU {s['split']}, {s['shots']}-shot, {s['model']} ({s['quant']} weights), "
          f"{s['world_size']} rank(s), sync {s['sync']}")
    print(f"{'subject':40s} {'n':>5s} {'accuracy':>9s} {'shots':>6s} {'cut':>4s}")
    for name, r in results["subjects"].items():
        mark = "" if name in subjects else " (earlier run)"
        shots = sum(int(k) * v for k, v in r["shots_used"].items()) / max(r["n"], 1)
        print(f"{name:40s} {r['n']:5d} {_pct(r['accuracy']):>9s} {shots:6.2f} "
              f"{r['truncated']:4d}{mark}")
    print(f"micro average {_pct(results['micro_avg'])} over {results['n_questions']} questions,"
          f" macro average {_pct(results['macro_avg'])} over {results['n_subjects']} subjects")


def _pct(value):
    return "-" if value is None else f"{100 * value:.2f}%"


# --- perplexity -------------------------------------------------------------------------------
def _perplexity(comm, args):
    comm.root_only(_read_text, args.text)   # fail before loading the model
    if args.out:
        comm.from_root(check_writable, args.out)
    model = _load(comm, args)
    ids = comm.root_only(_encode_text, model, args.text)
    window = args.window or model.max_seq_len
    evaluate.check_window(window, model.max_seq_len)
    progress = Progress(comm.is_root and not args.no_progress, "windows")
    progress.start(comm.bcast(-(-len(ids) // (window - 1)) if comm.is_root else None), 0)
    comm.barrier()
    started = time.perf_counter()
    result = evaluate.perplexity(model, ids, window, lambda n: progress.step("perplexity"))
    seconds = time.perf_counter() - started
    progress.close()
    info = conditions(comm, model, command="perplexity", text=str(args.text))
    if comm.is_root:
        result.update(text=str(args.text), seconds=seconds,
                      tokens_per_s=result["tokens_scored"] / seconds,
                      settings={"model": Path(model.path).name, "quant": info["quant"],
                                "sync": model.sync, "sync_scheme": model.scheme,
                                "world_size": comm.size, "window": window,
                                "text": Path(args.text).name},
                      conditions=info)
        print(f"perplexity {result['perplexity']:.4f}  mean NLL {result['mean_nll']:.5f}  "
              f"tokens scored {result['tokens_scored']}  windows {result['windows']} of "
              f"{window}  ({seconds:.1f} s, {result['tokens_per_s']:.0f} tokens/s)")
        if args.out:
            write_json_atomically(args.out, result)
    return 0


def _read_text(path):
    path = Path(path)
    if not path.is_file():
        raise DllmError(f"text file not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DllmError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _encode_text(model, path):
    if model.tokenizer is None:
        raise DllmError("this model file has no tokenizer: pass --tokenizer PATH "
                        "(a SentencePiece tokenizer.model)")
    return model.tokenizer.encode(_read_text(path), bos=False)


# --- compare ----------------------------------------------------------------------------------
def _compare(comm, args):
    report = comm.from_root(_compare_files, args.a, args.b, args.top)
    if comm.is_root:
        print(format_comparison(report, args.a, args.b))
        if args.out:
            write_json_atomically(args.out, report)
    return 0


def _read_json(path):
    path = Path(path)
    if not path.is_file():
        raise DllmError(f"results file not found: {path}")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DllmError(f"{path} is not a JSON file ({exc})") from None


def _compare_files(path_a, path_b, top):
    a, b = _read_json(path_a), _read_json(path_b)
    if a.get("kind") == b.get("kind") == evaluate.RESULTS_KIND:
        return {"kind": "mmlu", **evaluate.compare_mmlu(a, b, top)}
    if "perplexity" in a and "perplexity" in b:
        return {"kind": "perplexity", **evaluate.compare_perplexity(a, b)}
    raise DllmError(f"{path_a} and {path_b} are not two MMLU results files of dllm.eval mmlu "
                    f"nor two perplexity results")


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
class Progress:
    """A progress bar with the rate and an ETA on stderr. On a terminal it redraws in place
    at most 5 times a second; otherwise (a log file) it prints one line per subject."""

    def __init__(self, enabled, unit, stream=None):
        self.enabled, self.unit = enabled, unit
        self.stream = stream or sys.stderr
        self.tty = enabled and self.stream.isatty()
        self.total = self.done = 0
        self.label, self.drawn = None, 0.0

    def start(self, total, subjects_done=0):
        self.total, self.done, self.started = total, 0, time.perf_counter()
        if self.enabled and subjects_done:
            print(f"{PROG}: continuing: {subjects_done} subject(s) already in the results file",
                  file=self.stream, flush=True)

    def step(self, label):
        if not self.enabled:
            return
        if label != self.label and self.label is not None and not self.tty:
            self._line()
        self.label = label
        self.done += 1
        now = time.perf_counter()
        if self.tty and (now - self.drawn > 0.2 or self.done == self.total):
            self.drawn = now
            width = 24
            filled = int(width * self.done / max(self.total, 1))
            print(f"\r[{'#' * filled}{'.' * (width - filled)}] {self._status()}\033[K",
                  end="", file=self.stream, flush=True)

    def _status(self):
        seconds = time.perf_counter() - self.started
        rate = self.done / seconds if seconds > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        return (f"{self.done}/{self.total} {self.unit}  {rate:.2f} {self.unit}/s  "
                f"ETA {_clock(eta)}  {self.label}")

    def _line(self):
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
