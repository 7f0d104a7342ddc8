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

Resuming: with an output file, root checkpoints the work done (scored questions, the NLL of
every window) atomically at least every CHECKPOINT_SECONDS and at each subject's end; a rerun
with the same settings skips what the file holds and ends with the file an uninterrupted run
writes (apart from timings and the log of runs). Only root touches files; what the other
ranks need (how much is done) is broadcast.
"""
import csv
import difflib
import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checks import read_json
from .errors import DllmError, on_one_rank

LETTERS = "ABCD"
ANSWER_PROBE = "Answer:"      # every MMLU prompt ends with it; choices are scored after it
RESULTS_KIND = "dllm-mmlu-results"
RESULTS_VERSION = 1
PERPLEXITY_KIND = "dllm-perplexity-results"
PERPLEXITY_VERSION = 1
CHECKPOINT_SECONDS = 30.0     # an interrupted run loses at most about this much work
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




# --- perplexity -----------------------------------------------------------------------------
def perplexity_windows(ids, window, bos_id):
    """[BOS] + chunk for consecutive chunks of window - 1 ids; the last chunk may be shorter."""
    step = window - 1
    return [[bos_id] + list(ids[s:s + step]) for s in range(0, len(ids), step)]


def check_window(window, max_seq_len):
    if not 2 <= window <= max_seq_len:
        raise DllmError(f"--window must be between 2 and the context of {max_seq_len} tokens, "
                        f"got {window}")


def perplexity_settings(run, window, about=None):
    """What must be equal for two perplexity runs to share a results file: run_settings,
    the window and `about` (the CLI adds the text's name and SHA-256 and the tokenizer)."""
    return {**run, "window": window, **(about or {})}


def ids_settings(ids):
    """The token stream's length and SHA-256: another text or tokenizer is another run."""
    return {"tokens": len(ids),
            "ids_sha256": hashlib.sha256(np.asarray(ids, dtype="<i8").tobytes()).hexdigest()}


def perplexity(model, ids, window=None, progress=None, out=None, about=None, conditions=None,
               after_window=None, checkpoint_every=CHECKPOINT_SECONDS):
    """Perplexity of a token stream; collective (every rank calls it).

    ids: the text's token ids without BOS, on root (ignored elsewhere). window: tokens per
    forward pass including BOS (default: the model's context). progress: object with
    start(total, note) and step(label), called on every rank. out: JSON path (root writes
    it): the NLL of every window done is checkpointed there, float64 in window order, after
    the first window that ends checkpoint_every seconds after the last write; a rerun with
    the same settings continues after the last window saved and gives the identical
    perplexity; a finished file is returned as it is, one of other settings is refused. about: more settings that must match
    (see perplexity_settings). conditions: logged in the file's "runs". after_window(i):
    called on every rank after window i (tests interrupt there). Returns on root a dict
    with perplexity, mean_nll, tokens_scored, windows, window, method, window_nll, seconds,
    tokens_per_s, settings (what out holds); None elsewhere.
    """
    comm = model.comm
    window = model.max_seq_len if window is None else window
    check_window(window, model.max_seq_len)
    windows = perplexity_windows(ids, window, model.config.bos_id) if comm.is_root else None
    count = comm.bcast(len(windows) if comm.is_root else None)
    if count == 0:
        raise DllmError("the text encodes to no tokens")
    state = comm.root_only(_open_perplexity, model, ids, window, about, out, count, conditions)
    done = comm.bcast(len(state["window_nll"]) if comm.is_root else None)
    if progress:
        progress.start(count - done, f"{done} of {count} windows already in the results file"
                       if done else None)
    saver = Checkpoint(out if comm.is_root else None, checkpoint_every)
    comm.barrier()   # start the clock together
    started = time.perf_counter()
    seconds = state["seconds"] if comm.is_root else None
    for i in range(done, count):
        logits = model.logits(windows[i] if comm.is_root else None)   # (len, vocab) on root
        if comm.is_root:
            targets = windows[i][1:]
            logp = log_softmax(logits[:-1])
            state["window_nll"].append(-float(logp[np.arange(len(targets)), targets].sum()))
            state["seconds"] = seconds + time.perf_counter() - started
            saver.maybe(state)
        if progress:
            progress.step("perplexity")
        if after_window:
            after_window(i)
    if not comm.is_root:
        return None
    if done < count:
        state = _finished(state, len(ids))
        saver.save(state)
    return state


def _finished(state, scored):
    """The checkpoint with the figures, which go first in the file."""
    total = 0.0
    for nll in state["window_nll"]:   # in window order: a resumed run adds the same numbers
        total += nll
    seconds = state["seconds"]
    figures = {"perplexity": math.exp(total / scored), "mean_nll": total / scored,
               "tokens_scored": scored, "tokens_per_s": scored / seconds if seconds else None}
    head = {key: state[key] for key in ("kind", "version")}
    rest = {k: v for k, v in state.items() if k not in head and k != "window_nll"}
    return {**head, **figures, **rest, "window_nll": state["window_nll"]}


def _open_perplexity(model, ids, window, about, out, count, conditions):
    settings = {**perplexity_settings(run_settings(model), window, about), **ids_settings(ids)}
    state = load_perplexity(out, settings) if out else None
    if state is None:
        state = {"kind": PERPLEXITY_KIND, "version": PERPLEXITY_VERSION,
                 "method": PERPLEXITY_METHOD, "settings": settings, "window": window,
                 "windows": count, "window_nll": [], "seconds": 0.0, "runs": []}
    if state["windows"] != count or len(state["window_nll"]) > count:
        raise DllmError(f"--out {out} holds {len(state['window_nll'])} of {state['windows']} "
                        f"windows but this text has {count}: choose another --out")
    if len(state["window_nll"]) < count:
        state["runs"].append({**(conditions or {}),
                              "windows_run": [len(state["window_nll"]), count]})
        state["conditions"] = conditions
    return state


def load_perplexity(path, settings):
    """An existing perplexity results file (finished or a checkpoint) to continue, or None.
    Refuses (DllmError) a file that is not one, or whose settings differ from `settings` (only
    the keys given are compared, so a caller may check before the model is loaded)."""
    path = Path(path)
    if not path.exists():
        return None
    state = _read_out(path)
    if results_kind(state) == "mmlu":
        raise DllmError(f"--out {path} holds MMLU results (dllm.eval mmlu); refusing to "
                        f"overwrite it with perplexity: choose another --out")
    why = _perplexity_problem(state, checkpoint=True)
    if why:
        raise DllmError(f"--out {path} is not a dllm perplexity results file: {why}; "
                        f"refusing to overwrite it")
    _check_settings(path, state["settings"], settings)
    return state


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
    if not Path(path).is_file():
        raise DllmError(f"MMLU file not found: {path} (the data folder needs test/ and dev/ "
                        f"as in Hendrycks' data.tar; --shots 0 reads no dev/)")
    questions = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for number, row in enumerate(csv.reader(f), start=1):
                if len(row) != 6 or row[5].strip() not in LETTERS:
                    raise DllmError(f"{path}: row {number} is not question,A,B,C,D,answer "
                                    f"with an answer letter A-D")
                questions.append(Question(row[0], tuple(row[1:5]), row[5].strip()))
    except UnicodeDecodeError as exc:
        raise DllmError(f"{path} is not UTF-8 text ({exc.reason})") from None
    except csv.Error as exc:
        raise DllmError(f"{path} is not a readable CSV file ({exc})") from None
    except OSError as exc:
        raise DllmError(f"cannot read {path} ({exc.strerror or exc})") from None
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


def prompt_starts(prompts, reuse_prefix=True):
    """Where each prompt's forward pass begins: after the ids it shares with the prompt before
    it, whose KV cache is still there, but at its last id at the latest (its logits are
    needed); 0 for the first prompt, and for every prompt without reuse."""
    starts, cached = [], []
    for ids in prompts:
        starts.append(min(common_prefix(cached, ids) if reuse_prefix else 0, len(ids) - 1))
        cached = ids
    return starts


def replay_chain(starts, done):
    """The prompts before prompt `done` whose forward passes, rerun in order from their
    starts, leave the KV cache below starts[done] exactly as an uninterrupted run left it.

    Going back from `done`, the latest prompt that began below the positions still needed
    wrote them last (from its start on), and needs in turn what lay below its own start. A
    rerun gives identical floats only if every forward pass is the same call, so whole
    prompts are rerun, as first run. Usually this is one prompt: the subject's first, which
    computed the shared few-shot prefix."""
    need, chain = (starts[done] if done < len(starts) else 0), []
    for i in range(done - 1, -1, -1):
        if need == 0:
            break
        if starts[i] < need:
            chain.append(i)
            need = starts[i]
    return chain[::-1]


def score_prompts(model, prompts, continuations, reuse_prefix=True, progress=None, done=0,
                  on_scored=None):
    """Log-probabilities of the four continuations after each prompt; collective.

    prompts: list of id lists, continuations: {letter: ids}, both used from root. The KV cache
    is reused: a prompt runs from the first position where it differs from the prompt before
    it, so the few-shot prefix of a subject is computed once (reuse_prefix=False runs every
    prompt from position 0, for tests). done: prompts already scored by an earlier run; they
    are skipped, after the forward passes of replay_chain rebuild the cache they left, so the
    scores are those of an uninterrupted run. on_scored(i, logprobs, forwarded) is called on
    every rank after prompt i (logprobs on root, None elsewhere; forwarded: ids so far).
    Returns on root (results, ids forwarded), where results holds one [logP(A), .., logP(D)]
    per prompt scored; (None, ids forwarded) elsewhere. Replayed ids are not counted.
    """
    comm = model.comm
    prompts, continuations = comm.bcast((prompts, continuations) if comm.is_root else None)
    conts = [tuple(continuations[letter]) for letter in LETTERS]
    # Continuations longer than one id ('▁', 'C') need the logits after their first ids.
    inner = sorted({c[:j] for c in conts for j in range(1, len(c))})
    starts = prompt_starts(prompts, reuse_prefix)
    for i in replay_chain(starts, done):
        model.prefill(prompts[i][starts[i]:], starts[i])
    results, forwarded = [], 0
    for i in range(done, len(prompts)):
        ids, start = prompts[i], starts[i]
        after = {(): model.prefill(ids[start:], start)}
        forwarded += len(ids) - start
        for prefix in inner:   # written after the prompt; positions < len(ids) stay valid
            after[prefix] = model.forward(list(prefix), len(ids), logits="last")
            forwarded += len(prefix)
        scores = None
        if comm.is_root:
            logp = {key: log_softmax(value[-1]) for key, value in after.items()}
            scores = [sum(float(logp[c[:j]][c[j]]) for j in range(len(c))) for c in conts]
            results.append(scores)
        if on_scored:
            on_scored(i, scores, forwarded)
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


# --- MMLU run: resumable, question by question ---------------------------------------------------
def model_quant(model):
    return model.quant


def run_settings(model=None, *, path=None, quant=None, sync=None, sync_scheme=None,
                 world_size=None, prefill_chunk=None):
    """The model and engine settings a results file records: those of `model`, or the
    values given (the command line checks an --out before it loads the model)."""
    if model is not None:
        path, quant, sync = model.path, model_quant(model), model.sync
        sync_scheme, world_size = model.scheme, model.comm.size
        prefill_chunk = model.prefill_chunk
    # prefill_chunk: the shapes of the forward passes, on which float rounding depends; a
    # resumed run must make the same ones to give the same numbers.
    return {"model": Path(path).name if path else None, "quant": quant, "sync": sync,
            "sync_scheme": sync_scheme, "world_size": world_size, "prefill_chunk": prefill_chunk}


def mmlu_settings(model, shots, limit, split="test", run=None, max_seq_len=None):
    """What must be equal for two runs to share a results file (run and max_seq_len replace
    the model's figures when the model is not loaded yet)."""
    run = run_settings(model) if run is None else run
    context = model.max_seq_len if max_seq_len is None else max_seq_len
    return {"split": split, "shots": shots, "limit": limit, **run, "max_seq_len": context}


def new_results(settings, continuations):
    return {"kind": RESULTS_KIND, "version": RESULTS_VERSION, "settings": settings,
            "prompt_format": "hendrycks", "scoring": SCORING_METHOD,
            "choice_tokens": continuations, "runs": [], "subjects": {}, "in_progress": {}}


def load_results(path, settings):
    """An existing results file to continue, or None. Refuses (DllmError) a file that is not
    dllm MMLU results or whose settings differ from `settings` (only the keys given are
    compared, so a caller may check before the model is loaded): nothing is overwritten."""
    path = Path(path)
    if not path.exists():
        return None
    results = _read_out(path)
    why = _mmlu_problem(results, resumable=True)
    if why:
        raise DllmError(f"--out {path} is not a dllm MMLU results file: {why}; refusing to "
                        f"overwrite it")
    _check_settings(path, results["settings"], settings)
    results.setdefault("in_progress", {})   # files written before checkpoints existed
    return results


def _read_out(path):
    try:
        return read_json(path, "--out")
    except DllmError as exc:
        raise DllmError(f"{exc}; refusing to overwrite it") from None


def _check_settings(path, old, new):
    for key, value in new.items():
        if old.get(key) != value:
            raise DllmError(f"--out {path} holds a run with {key} {old.get(key)!r}, this run "
                            f"has {value!r}: continue it with the same settings or choose "
                            f"another --out")


def write_results(path, results):
    from .atomic import write_json
    write_json(path, results)


class Checkpoint:
    """Root's atomic rewrites of a results file: save() now, maybe() when `every` seconds
    have passed since the last save. Without a path (other ranks, no --out) it does nothing."""

    def __init__(self, path, every=CHECKPOINT_SECONDS):
        self.path, self.every, self.saved = path, every, time.monotonic()

    def maybe(self, data):
        if self.path and time.monotonic() - self.saved >= self.every:
            self.save(data)

    def save(self, data):
        if self.path:   # on root alone, while the other ranks compute
            on_one_rank(write_results, self.path, data)
            self.saved = time.monotonic()


def run_mmlu(model, data_dir, subjects, shots=5, limit=None, out=None, conditions=None,
             progress=None, after_subject=None, reuse_prefix=True, after_question=None,
             checkpoint_every=CHECKPOINT_SECONDS):
    """Evaluate MMLU subjects; collective. Returns the results dict on root, None elsewhere.

    subjects: names already checked (see select_subjects). out: JSON path; an existing file
    of the same settings is continued: its subjects are kept and not run again, and the
    questions of a subject in progress ("in_progress") are not scored again. Root rewrites
    the file atomically at least every checkpoint_every seconds and after every subject.
    conditions: recorded in results["runs"]. progress: object with start(total, note) and
    step(subject) (called on every rank). after_question(subject, index) and
    after_subject(subject): called on every rank after a question is recorded (and
    checkpointed when due) and after a subject is saved (tests interrupt there).
    """
    comm = model.comm
    results = comm.root_only(_open_results, model, shots, limit, out)
    pending, resumed, counts = comm.from_root(_plan_subjects, results, subjects, data_dir, limit)
    if progress:
        progress.start(sum(counts) - sum(resumed.values()),
                       _resume_note(len(subjects) - len(pending), resumed))
    if comm.is_root:
        results["runs"].append({**(conditions or {}), "subjects_run": pending,
                                **({"questions_resumed": resumed} if resumed else {})})
    saver = Checkpoint(out if comm.is_root else None, checkpoint_every)
    for subject in pending:
        _run_subject(model, results, data_dir, subject, shots, limit, resumed.get(subject, 0),
                     reuse_prefix, saver, progress, after_question)
        if after_subject:
            after_subject(subject)
    if comm.is_root:
        results.update(summarize(results["subjects"]))
        saver.save(results)
    return results if comm.is_root else None


def _plan_subjects(results, subjects, data_dir, limit):
    """Subjects to run, {subject: questions already scored} of those in progress, and the
    number of questions of each subject to run."""
    pending = [s for s in subjects if s not in results["subjects"]]
    resumed = {s: len(results["in_progress"][s]["questions"]) for s in pending
               if results["in_progress"].get(s, {}).get("questions")}
    counts = _question_counts(data_dir, pending, limit)
    for subject, count in zip(pending, counts):
        if resumed.get(subject, 0) > count:
            raise DllmError(f"the results file holds {resumed[subject]} questions of {subject} "
                            f"in progress but the data has {count}: choose another --out")
    return pending, resumed, counts


def _resume_note(subjects_done, resumed):
    parts = [f"{subjects_done} subject(s)"] if subjects_done else []
    parts += [f"{n} question(s) of {s}" for s, n in resumed.items()]
    return " and ".join(parts) + " already in the results file" if parts else None


def _run_subject(model, results, data_dir, subject, shots, limit, done, reuse_prefix, saver,
                 progress, after_question):
    """Score one subject's questions from `done` on; root records each into
    results["in_progress"][subject] (checkpointed when due), then the subject's record."""
    comm = model.comm
    started = time.perf_counter()
    prompts, questions = comm.root_only(_subject_prompts, model, data_dir, subject, shots,
                                        limit, results) or (None, None)
    partial = before = None
    if comm.is_root:
        partial = results["in_progress"].setdefault(
            subject, {"questions": [], "seconds": 0.0, "tokens_forwarded": 0})
        before = dict(partial)

    def scored(i, logprobs, forwarded):
        if comm.is_root:
            partial["questions"].append(question_record(i, questions[i], prompts[i], logprobs))
            partial["seconds"] = before["seconds"] + time.perf_counter() - started
            partial["tokens_forwarded"] = before["tokens_forwarded"] + forwarded
            saver.maybe(results)
        if progress:
            progress.step(subject)
        if after_question:
            after_question(subject, i)

    score_prompts(model, [p.ids for p in prompts] if comm.is_root else None,
                  results["choice_tokens"] if comm.is_root else None, reuse_prefix,
                  done=done, on_scored=scored)
    if comm.is_root:
        del results["in_progress"][subject]
        results["subjects"][subject] = subject_record(
            partial["questions"], before["seconds"] + time.perf_counter() - started,
            partial["tokens_forwarded"])
        results.update(summarize(results["subjects"]))
        saver.save(results)


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


# --- what a results file must hold (compare, resuming) -----------------------------------------
def results_kind(data):
    """"mmlu", "perplexity" (a finished result or a checkpoint; files of dllm before
    checkpoints have no "kind") or None: what a JSON document claims to be."""
    if not isinstance(data, dict):
        return None
    if data.get("kind") == RESULTS_KIND:
        return "mmlu"
    if data.get("kind") == PERPLEXITY_KIND or ("kind" not in data and "perplexity" in data):
        return "perplexity"
    return None


def check_results(data, name):
    """The kind ("mmlu" or "perplexity") of a finished results file for compare; DllmError
    "<name> is not a dllm ... results file: <why>" when it is not one."""
    kind = results_kind(data)
    if kind is None:
        raise DllmError(f"{name} is not a dllm MMLU or perplexity results file: "
                        f"{_not_ours(data)}")
    why = _mmlu_problem(data) if kind == "mmlu" else _perplexity_problem(data)
    if why:
        raise DllmError(f"{name} is not a dllm {'MMLU' if kind == 'mmlu' else kind} results "
                        f"file: {why}")
    return kind


JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number",
              bool: "true or false", type(None): "null"}


def _not_ours(data):
    if not isinstance(data, dict):
        return f"it holds {JSON_TYPES.get(type(data), 'a value')}, not a JSON object"
    return f"its kind is {data.get('kind')!r}" if "kind" in data else "it has no \"kind\""


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _question_problem(q):
    if not isinstance(q, dict):
        return "a question record is not a JSON object"
    index = q.get("index")
    if not _is_int(index) or index < 0:
        return f"a question has index {index!r}"
    logprobs = q.get("logprobs")
    if not (isinstance(logprobs, list) and len(logprobs) == 4 and all(map(_is_number, logprobs))):
        return f"question {index}: logprobs is not 4 numbers"
    if q.get("prediction") not in tuple(LETTERS) or q.get("answer") not in tuple(LETTERS):
        return f"question {index}: prediction or answer is not a letter A-D"
    if not (isinstance(q.get("correct"), bool) and _is_int(q.get("shots"))
            and isinstance(q.get("truncated"), bool)):
        return f"question {index}: correct, shots or truncated is missing or of the wrong type"
    return None


def _questions_problem(record):
    questions = record.get("questions") if isinstance(record, dict) else None
    if not isinstance(questions, list):
        return "it has no list of questions"
    for q in questions:
        why = _question_problem(q)
        if why:
            return why
    return None


def _subject_problem(s):
    why = _questions_problem(s)
    if why:
        return why
    if not (_is_int(s.get("n")) and s["n"] == len(s["questions"]) and _is_int(s.get("correct"))
            and _is_int(s.get("truncated")) and isinstance(s.get("shots_used"), dict)
            and (s.get("accuracy") is None or _is_number(s.get("accuracy")))):
        return "n, correct, accuracy, shots_used or truncated is missing or does not fit"
    return None


def _mmlu_problem(r, resumable=False):
    """Why r is not what run_mmlu writes (None if it is). resumable: also what continuing
    it needs (runs, choice tokens, subjects in progress)."""
    if results_kind(r) != "mmlu":
        return _not_ours(r)
    if r.get("version", RESULTS_VERSION) != RESULTS_VERSION:
        return f"version {r.get('version')!r} (this dllm reads version {RESULTS_VERSION})"
    needed = ["settings", "subjects"] + (["choice_tokens"] if resumable else [])
    for key in needed:
        if not isinstance(r.get(key), dict):
            return f"\"{key}\" is {'missing' if key not in r else 'not a JSON object'}"
    if resumable and not isinstance(r.get("runs"), list):
        return f"\"runs\" is {'missing' if 'runs' not in r else 'not a JSON list'}"
    for name, s in r["subjects"].items():
        why = _subject_problem(s) if isinstance(s, dict) else "not a JSON object"
        if why:
            return f"subject {name}: {why}"
    in_progress = r.get("in_progress", {})
    if not isinstance(in_progress, dict):
        return "\"in_progress\" is not a JSON object"
    for name, s in in_progress.items():
        why = _questions_problem(s)
        if not why and [q["index"] for q in s["questions"]] != list(range(len(s["questions"]))):
            why = "its questions are not rows 0, 1, 2, ... of the test file"
        if not why and not (_is_number(s.get("seconds")) and _is_int(s.get("tokens_forwarded"))):
            why = "seconds or tokens_forwarded is missing"
        if why:
            return f"subject {name} (in progress): {why}"
    return None


def _perplexity_problem(r, checkpoint=False):
    """Why r is not a finished perplexity result (None if it is); checkpoint: a file that
    perplexity() can continue (finished or not) is required instead."""
    if results_kind(r) != "perplexity":
        return _not_ours(r)
    if "kind" not in r:
        return ("it was written by a dllm without checkpoints; choose another --out"
                if checkpoint else _finished_problem(r))
    if r.get("version") != PERPLEXITY_VERSION:
        return f"version {r.get('version')!r} (this dllm reads version {PERPLEXITY_VERSION})"
    nll, windows = r.get("window_nll"), r.get("windows")
    if not (isinstance(r.get("settings"), dict) and isinstance(r.get("runs"), list)
            and isinstance(nll, list) and all(map(_is_number, nll)) and _is_int(windows)
            and len(nll) <= windows and _is_number(r.get("seconds"))):
        return "settings, runs, window_nll, windows or seconds is missing or does not fit"
    if checkpoint and len(nll) < windows:
        return None
    if len(nll) < windows:
        return (f"the run is unfinished ({len(nll)} of {windows} windows); finish it by "
                f"running the same command again")
    return _finished_problem(r)


def _finished_problem(r):
    for key, test in (("perplexity", _is_number), ("mean_nll", _is_number),
                      ("tokens_scored", _is_int)):
        if not test(r.get(key)):
            return f"\"{key}\" is {'missing' if key not in r else 'not a number'}"
    if r.get("tokens_scored") < 1 or r["perplexity"] <= 0:
        return "tokens_scored or perplexity is not positive"
    if not isinstance(r.get("settings", {}), dict):
        return "\"settings\" is not a JSON object"
    return None


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
    if top < 1:
        raise DllmError(f"--top must be at least 1, got {top}")
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
