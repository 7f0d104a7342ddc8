"""Evaluation: perplexity of a text and MMLU accuracy, scored by the distributed model.

Root owns the text: it reads files, builds prompts, tokenizes and turns logits into
log-probabilities. Every rank runs the same forward calls in the same order (the token ids
are broadcast), so a run at N ranks computes what a run at one rank computes, up to the
rounding of the sync payload (tests/test_eval.py checks 1 rank against N with f32 sync).

Perplexity (``perplexity``): the method of the tinystories reference.json files. The whole
text is encoded once without BOS; its ids are cut into consecutive non-overlapping chunks of
window - 1 ids (the last one shorter); each chunk runs from position 0 as [BOS] + chunk; every
chunk id is scored (BOS is not), and perplexity = exp(total NLL / ids scored).

MMLU (``run_mmlu``): the prompt format of Hendrycks et al. (2021), a header, k dev examples
ending in "Answer: X" and the test question ending in "Answer:"; each choice is scored by the
log-probability of the text " A" / " B" / " C" / " D" after the prompt (no generation). See
docs/evaluation.md for the choices made where the original leaves room.
"""
import csv
import difflib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DllmError

LETTERS = "ABCD"
ANSWER_PROBE = "Answer:"      # every MMLU prompt ends with it; choices are scored after it
RESULTS_KIND = "dllm-mmlu-results"
RESULTS_VERSION = 1
PERPLEXITY_METHOD = (
    "ids = encode(whole text) without BOS/EOS; consecutive non-overlapping chunks of "
    "window-1 ids (the last one shorter); each chunk runs as [BOS] + chunk from position 0; "
    "the NLL of every chunk id is scored (BOS is not); perplexity = exp(total NLL / ids scored)")
SCORING_METHOD = (
    "log P(' X' | prompt) for X in A-D: the ids that encode('Answer: X') adds to "
    "encode('Answer:'), log-softmax over the whole vocabulary, summed over those ids; "
    "prediction = the choice with the highest log-probability")


# --- log-probabilities (root) ---------------------------------------------------------------
def log_softmax(logits):
    """float64 log-probabilities of each row of (T, vocab) logits."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def forward_from(model, ids, pos, logits="last"):
    """Collective: run ids at positions pos.. in chunks of model.prefill_chunk (matrix-matrix
    kernels); returns the last chunk's logits on root."""
    out = None
    for start in range(0, len(ids), model.prefill_chunk):
        chunk = ids[start:start + model.prefill_chunk]
        last = start + len(chunk) == len(ids)
        out = model.forward(chunk, pos + start, logits if last else None)
    return out


# --- perplexity -----------------------------------------------------------------------------
def perplexity_windows(ids, window, bos_id):
    """[BOS] + chunk for consecutive chunks of window - 1 ids; the last chunk may be shorter."""
    step = window - 1
    return [[bos_id] + list(ids[s:s + step]) for s in range(0, len(ids), step)]


def check_window(window, max_seq_len):
    if not 2 <= window <= max_seq_len:
        raise DllmError(f"--window must be between 2 and the context of {max_seq_len} tokens, "
                        f"got {window}")


def perplexity(model, ids, window=None, progress=None):
    """Perplexity of a token stream; collective (every rank calls it).

    ids: the text's token ids without BOS, on root (ignored elsewhere). window: tokens per
    forward pass including BOS (default: the model's context). progress(n) is called after
    each window on every rank. Returns on root a dict with perplexity, mean_nll,
    tokens_scored, windows, window, method; None elsewhere.
    """
    comm = model.comm
    window = window or model.max_seq_len
    check_window(window, model.max_seq_len)
    windows = perplexity_windows(ids, window, model.config.bos_id) if comm.is_root else None
    count = comm.bcast(len(windows) if comm.is_root else None)
    if count == 0:
        raise DllmError("the text encodes to no tokens")
    total, scored = 0.0, 0
    for i in range(count):
        logits = model.logits(windows[i] if comm.is_root else None)   # (len, vocab) on root
        if comm.is_root:
            targets = windows[i][1:]
            logp = log_softmax(logits[:-1])
            total -= float(logp[np.arange(len(targets)), targets].sum())
            scored += len(targets)
        if progress:
            progress(1)
    if not comm.is_root:
        return None
    return {"perplexity": math.exp(total / scored), "mean_nll": total / scored,
            "tokens_scored": scored, "windows": count, "window": window,
            "method": PERPLEXITY_METHOD}


# --- MMLU data --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Question:
    """One MMLU row: question, the four choices A-D, the answer letter."""
    question: str
    choices: tuple
    answer: str


def read_questions(path):
    """Rows `question,A,B,C,D,answer` of a Hendrycks CSV (no header); fields may hold commas,
    quotes and newlines, so a real CSV parser reads them."""
    questions = []
    with open(path, newline="", encoding="utf-8") as f:
        for number, row in enumerate(csv.reader(f), start=1):
            if len(row) != 6 or row[5].strip() not in LETTERS:
                raise DllmError(f"{path}: row {number} is not question,A,B,C,D,answer "
                                f"with an answer letter A-D")
            questions.append(Question(row[0], tuple(row[1:5]), row[5].strip()))
    return questions


def list_subjects(data_dir, split="test"):
    """Subject names of a Hendrycks data folder: DIR/{split}/<subject>_{split}.csv."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DllmError(f"MMLU data folder not found: {data_dir}")
    folder = data_dir / split
    suffix = f"_{split}.csv"
    names = sorted(p.name[:-len(suffix)] for p in folder.glob(f"*{suffix}")) \
        if folder.is_dir() else []
    if not names:
        raise DllmError(f"{data_dir} is not an MMLU data folder: no {split}/<subject>{suffix} "
                        f"files (expected the layout of Hendrycks' data.tar)")
    return names


def select_subjects(available, requested):
    """The requested subjects (all when None), in the order given, each checked."""
    if not requested:
        return list(available)
    for name in requested:
        if name not in available:
            close = difflib.get_close_matches(name, available, n=1)
            hint = f"; did you mean {close[0]}?" if close else \
                f"; the data has {len(available)} subjects, e.g. {available[0]}"
            raise DllmError(f"unknown subject {name!r}{hint}")
    return list(dict.fromkeys(requested))


def read_subject(data_dir, subject, shots, limit=None):
    """(dev examples, test questions) of a subject; the first `limit` test questions."""
    data_dir = Path(data_dir)
    test = read_questions(data_dir / "test" / f"{subject}_test.csv")
    dev_path = data_dir / "dev" / f"{subject}_dev.csv"
    dev = read_questions(dev_path) if shots else []
    if len(dev) < shots:
        raise DllmError(f"--shots {shots} needs {shots} dev questions but {dev_path} has "
                        f"{len(dev)}")
    return dev[:shots], test[:limit]


# --- MMLU prompts ---------------------------------------------------------------------------
def subject_title(subject):
    return subject.replace("_", " ")


def prompt_header(subject):
    return f"The following are multiple choice questions (with answers) about " \
           f"{subject_title(subject)}.\n\n"


def format_question(q, with_answer):
    """'question\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:' and, for a dev example, ' X\\n\\n'."""
    text = q.question + "".join(f"\n{letter}. {choice}"
                                for letter, choice in zip(LETTERS, q.choices))
    text += f"\n{ANSWER_PROBE}"
    return text + f" {q.answer}\n\n" if with_answer else text


def prompt_text(subject, dev, question, shots):
    return prompt_header(subject) + "".join(format_question(d, True) for d in dev[:shots]) + \
        format_question(question, False)


def choice_tokens(tokenizer):
    """{letter: ids of ' X' after 'Answer:'}: what encode('Answer: X') adds to
    encode('Answer:'). One id each with Llama tokenizers ('▁A'); a small vocabulary may
    spell some letters as two ids ('▁', 'C'), then all of them are scored."""
    base = tokenizer.encode(ANSWER_PROBE, bos=False)
    tokens = {}
    for letter in LETTERS:
        ids = tokenizer.encode(f"{ANSWER_PROBE} {letter}", bos=False)
        if ids[:len(base)] != base or len(ids) == len(base):
            raise DllmError(f"the tokenizer does not spell 'Answer: {letter}' as 'Answer:' "
                            f"followed by new tokens; MMLU choices cannot be scored with it")
        tokens[letter] = ids[len(base):]
    return tokens


@dataclass(frozen=True)
class Prompt:
    ids: list          # with BOS
    shots: int         # dev examples it holds
    truncated: bool    # even zero-shot did not fit: cut from the left, BOS kept


def build_prompt(tokenizer, subject, dev, question, shots, budget):
    """The prompt with the most shots (at most `shots`) whose ids fit in `budget` tokens.
    If even the zero-shot prompt is too long, its oldest ids are dropped (BOS is kept)."""
    for k in range(shots, -1, -1):
        ids = tokenizer.encode(prompt_text(subject, dev, question, k), bos=True)
        if len(ids) <= budget:
            return Prompt(ids, k, False)
    return Prompt(ids[:1] + ids[len(ids) - budget + 1:], 0, True)


def prompt_budget(max_seq_len, continuations):
    """Prompt ids that fit: the longest continuation's last id is never forwarded."""
    return max_seq_len - (max(len(c) for c in continuations.values()) - 1)


# --- MMLU scoring (collective) ----------------------------------------------------------------
def common_prefix(a, b):
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def score_prompts(model, prompts, continuations, reuse_prefix=True, progress=None):
    """Log-probabilities of the four continuations after each prompt; collective.

    prompts: list of id lists, continuations: {letter: ids}, both used from root. The KV cache
    is reused: a prompt runs from the first position where it differs from the prompt before
    it, so the few-shot prefix of a subject is computed once (reuse_prefix=False runs every
    prompt from position 0, for tests). Returns on root (results, ids forwarded), where results
    holds one [logP(A), .., logP(D)] per prompt; (None, ids forwarded) elsewhere.
    """
    comm = model.comm
    prompts, continuations = comm.bcast((prompts, continuations) if comm.is_root else None)
    conts = [tuple(continuations[letter]) for letter in LETTERS]
    # Continuations longer than one id ('▁', 'C') need the logits after their first ids.
    inner = sorted({c[:j] for c in conts for j in range(1, len(c))})
    cached, results, forwarded = [], [], 0
    for ids in prompts:
        start = min(common_prefix(cached, ids) if reuse_prefix else 0, len(ids) - 1)
        after = {(): forward_from(model, ids[start:], start)}
        forwarded += len(ids) - start
        for prefix in inner:   # written after the prompt; positions < len(ids) stay valid
            after[prefix] = model.forward(list(prefix), len(ids), logits="last")
            forwarded += len(prefix)
        cached = ids
        if comm.is_root:
            logp = {key: log_softmax(value[-1]) for key, value in after.items()}
            results.append([sum(float(logp[c[:j]][c[j]]) for j in range(len(c))) for c in conts])
        if progress:
            progress(1)
    return (results if comm.is_root else None), forwarded


def question_record(index, question, prompt, logprobs):
    prediction = LETTERS[int(np.argmax(logprobs))]
    return {"index": index, "answer": question.answer, "prediction": prediction,
            "correct": prediction == question.answer, "logprobs": logprobs,
            "shots": prompt.shots, "prompt_tokens": len(prompt.ids),
            "truncated": prompt.truncated}


def subject_record(records, seconds, forwarded):
    correct = sum(r["correct"] for r in records)
    shots = {}
    for r in records:
        shots[str(r["shots"])] = shots.get(str(r["shots"]), 0) + 1
    return {"n": len(records), "correct": correct,
            "accuracy": correct / len(records) if records else None,
            "shots_used": dict(sorted(shots.items(), reverse=True)),
            "truncated": sum(r["truncated"] for r in records),
            "seconds": seconds, "tokens_forwarded": forwarded, "questions": records}


def summarize(subjects):
    """Micro average (over questions) and macro average (over subjects) of subject records."""
    scored = [s for s in subjects.values() if s["n"]]
    n = sum(s["n"] for s in scored)
    return {"micro_avg": sum(s["correct"] for s in scored) / n if n else None,
            "macro_avg": float(np.mean([s["accuracy"] for s in scored])) if scored else None,
            "n_questions": n, "n_subjects": len(scored)}


# --- MMLU run: resumable, one subject at a time --------------------------------------------------
def mmlu_settings(model, shots, limit, split="test"):
    """What must be equal for two runs to share a results file."""
    return {"split": split, "shots": shots, "limit": limit,
            "model": Path(model.path).name if model.path else None,
            "quant": "q40" if model.weights["layers/0/wq"].dtype == np.uint8 else "f32",
            "sync": model.sync, "sync_scheme": model.scheme, "world_size": model.comm.size,
            "max_seq_len": model.max_seq_len}


def new_results(settings, continuations):
    return {"kind": RESULTS_KIND, "version": RESULTS_VERSION, "settings": settings,
            "prompt_format": "hendrycks", "scoring": SCORING_METHOD,
            "choice_tokens": continuations, "runs": [], "subjects": {}}


def load_results(path, settings):
    """An existing results file to continue, or None; refuses a file of other settings or of
    another kind, so that nothing is overwritten."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        results = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DllmError(f"--out {path} exists but cannot be read as JSON ({exc}); "
                        f"refusing to overwrite it") from None
    if not isinstance(results, dict) or results.get("kind") != RESULTS_KIND:
        raise DllmError(f"--out {path} exists and is not a dllm MMLU results file; "
                        f"refusing to overwrite it")
    old = results.get("settings", {})
    for key, value in settings.items():
        if old.get(key) != value:
            raise DllmError(f"--out {path} holds a run with {key} {old.get(key)!r}, this run "
                            f"has {value!r}: continue it with the same settings or choose "
                            f"another --out")
    return results


def write_results(path, results):
    from .stats import write_json_atomically
    write_json_atomically(path, results)


def run_mmlu(model, data_dir, subjects, shots=5, limit=None, out=None, conditions=None,
             progress=None, after_subject=None, reuse_prefix=True):
    """Evaluate MMLU subjects; collective. Returns the results dict on root, None elsewhere.

    subjects: names already checked (see select_subjects). out: JSON path; an existing file
    of the same settings is continued (its subjects are kept and not run again) and the file
    is rewritten atomically after every subject. conditions: recorded in results["runs"].
    progress: object with start(total, done) and step(subject) (called on every rank).
    after_subject(name): called on every rank after a subject is saved (tests interrupt there).
    """
    comm = model.comm
    results = comm.root_only(_open_results, model, shots, limit, out)
    pending = comm.bcast([s for s in subjects if s not in results["subjects"]]
                         if comm.is_root else None)
    counts = comm.from_root(_question_counts, data_dir, pending, limit)
    if progress:
        progress.start(sum(counts), len(subjects) - len(pending))
    if comm.is_root:
        results["runs"].append({**(conditions or {}), "subjects_run": pending})
    for subject in pending:
        started = time.perf_counter()
        prompts, questions = comm.root_only(_subject_prompts, model, data_dir, subject, shots,
                                            limit, results) or (None, None)
        scores, forwarded = score_prompts(
            model, [p.ids for p in prompts] if comm.is_root else None,
            results["choice_tokens"] if comm.is_root else None, reuse_prefix,
            (lambda n, s=subject: progress.step(s)) if progress else None)
        if comm.is_root:
            records = [question_record(i, q, p, s)
                       for i, (q, p, s) in enumerate(zip(questions, prompts, scores))]
            results["subjects"][subject] = subject_record(
                records, time.perf_counter() - started, forwarded)
            results.update(summarize(results["subjects"]))
            if out:
                write_results(out, results)
        if after_subject:
            after_subject(subject)
    if comm.is_root:
        results.update(summarize(results["subjects"]))
        if out:
            write_results(out, results)
    return results if comm.is_root else None


def _open_results(model, shots, limit, out):
    if model.tokenizer is None:
        raise DllmError("this model file has no tokenizer: pass --tokenizer PATH "
                        "(a SentencePiece tokenizer.model)")
    settings = mmlu_settings(model, shots, limit)
    continuations = choice_tokens(model.tokenizer)
    results = load_results(out, settings) if out else None
    if results is None:
        return new_results(settings, continuations)
    if results.get("choice_tokens") != continuations:
        raise DllmError(f"--out {out} was scored with other choice tokens "
                        f"{results.get('choice_tokens')}: choose another --out")
    return results


def _question_counts(data_dir, subjects, limit):
    return [len(read_questions(Path(data_dir) / "test" / f"{s}_test.csv")[:limit])
            for s in subjects]


def _subject_prompts(model, data_dir, subject, shots, limit, results):
    dev, questions = read_subject(data_dir, subject, shots, limit)
    budget = prompt_budget(model.max_seq_len, results["choice_tokens"])
    prompts = [build_prompt(model.tokenizer, subject, dev, q, shots, budget) for q in questions]
    return prompts, questions


# --- comparing two result files ---------------------------------------------------------------
def _questions_by_key(results):
    return {(subject, q["index"]): q for subject, s in results["subjects"].items()
            for q in s["questions"]}


def mcnemar_p(only_a, only_b):
    """Two-sided exact McNemar test: binomial(n = discordant pairs, 1/2)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


def compare_mmlu(a, b, top=10, z=1.96):
    """Paired comparison of two MMLU result files over the questions both hold.

    The accuracy difference (B - A) is the mean of the per-question differences of
    correctness (each -1, 0 or +1); its confidence interval is the normal one of that paired
    mean (z = 1.96: 95%). Also: agreement of the predicted letters, the largest change of a
    log-probability, McNemar's exact test and the subjects that moved the most.
    """
    qa, qb = _questions_by_key(a), _questions_by_key(b)
    keys = sorted(qa.keys() & qb.keys())
    if not keys:
        raise DllmError("the two result files have no question in common")
    ca = np.array([qa[k]["correct"] for k in keys], dtype=np.float64)
    cb = np.array([qb[k]["correct"] for k in keys], dtype=np.float64)
    d, n = cb - ca, len(keys)
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else None   # no interval from one
    la = np.array([qa[k]["logprobs"] for k in keys], dtype=np.float64)
    lb = np.array([qb[k]["logprobs"] for k in keys], dtype=np.float64)
    only_a, only_b = int(((ca == 1) & (cb == 0)).sum()), int(((ca == 0) & (cb == 1)).sum())
    return {
        "questions": n, "only_in_a": len(qa) - n, "only_in_b": len(qb) - n,
        "accuracy_a": float(ca.mean()), "accuracy_b": float(cb.mean()),
        "difference": float(d.mean()), "stderr": se,
        "ci95": None if se is None else [float(d.mean() - z * se), float(d.mean() + z * se)],
        "both_correct": int(((ca == 1) & (cb == 1)).sum()), "only_a_correct": only_a,
        "only_b_correct": only_b, "both_wrong": int(((ca == 0) & (cb == 0)).sum()),
        "mcnemar_p": mcnemar_p(only_a, only_b),
        "agreement": float(np.mean([qa[k]["prediction"] == qb[k]["prediction"] for k in keys])),
        "logprob_max_abs_diff": float(np.abs(la - lb).max()),
        "logprob_max_rel_diff": float(np.abs(la - lb).max() / max(np.abs(la).max(), 1e-30)),
        "subjects": _subject_changes(keys, ca, cb, top),
        "settings_differ": _settings_diff(a.get("settings", {}), b.get("settings", {})),
    }


def _subject_changes(keys, ca, cb, top):
    by_subject = {}
    for (subject, _), x, y in zip(keys, ca, cb):
        by_subject.setdefault(subject, []).append((x, y))
    rows = [{"subject": s, "n": len(v), "accuracy_a": float(np.mean([x for x, _ in v])),
             "accuracy_b": float(np.mean([y for _, y in v]))} for s, v in by_subject.items()]
    for r in rows:
        r["change"] = r["accuracy_b"] - r["accuracy_a"]
    rows.sort(key=lambda r: (-abs(r["change"]), r["subject"]))
    return rows[:top]


def _settings_diff(a, b):
    return {k: [a.get(k), b.get(k)] for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def compare_perplexity(a, b):
    """Difference of two perplexity results (B - A), absolute and relative."""
    return {"perplexity_a": a["perplexity"], "perplexity_b": b["perplexity"],
            "difference": b["perplexity"] - a["perplexity"],
            "relative": b["perplexity"] / a["perplexity"] - 1.0,
            "mean_nll_difference": b["mean_nll"] - a["mean_nll"],
            "tokens_scored": [a["tokens_scored"], b["tokens_scored"]],
            "settings_differ": _settings_diff(a.get("settings", {}), b.get("settings", {}))}
