"""dllm.evaluate: MMLU prompts and scores, perplexity, resuming and comparing result files.

Data: a toy MMLU folder written here (always available) exercises the machinery; the real
MMLU data in ../shared/data/mmlu (a few questions) and the tinystories models in
../shared/models are used when present, else those tests skip. Tests marked mpi are
collective and also run under mpirun -n 2 / -n 4.
"""
import csv
import json
import math

import numpy as np
import pytest

import dllm
from dllm import evaluate
from dllm.comm import Comm
from dllm.config import ModelConfig
from dllm.convert import convert_hf
from dllm.errors import DllmError
from dllm.evaluate import Question
from dllm import demo_model
from dllm.modelfile import ModelFile, write_model
from dllm.tokenizer import Tokenizer

from conftest import SHARED, WORLD, all_ranks, random_weights
from reference import reference_logits, relative_error

MMLU = SHARED / "data" / "mmlu"
REAL_SUBJECTS = ["high_school_geography", "marketing"]
DEMO = demo_model()
# A tiny random float32 model with the demo's 512-token vocabulary and 256-token context.
TINY = ModelConfig(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2,
                   vocab_size=512, max_seq_len=256)

TOY = {  # subject -> (dev rows, test rows); fields with commas, quotes and newlines
    "toy_arithmetic": (
        [["1 + 1 = ?", "1", "2", "3", "4", "B"], ["2 + 2 = ?", "4", "5", "6", "7", "A"],
         ["3 + 3 = ?", "5", "7", "6", "9", "C"], ["4 + 4 = ?", "2", "4", "6", "8", "D"],
         ["5 + 5 = ?", "10", "11", "12", "13", "A"]],
        [["6 + 6 = ?", "10", "11", "12", "13", "C"],
         ["What is 7, plus 7?", "14", "15", "0", "1", "A"],
         ['Say "eight"\nplus eight', "15", "16", "17", "18", "B"],
         ["9 + 9 = ?", "1", "2", "3", "18", "D"]]),
    "toy_colours": (
        [["The sky is", "blue", "red", "green", "black", "A"],
         ["Grass is", "red", "green", "blue", "pink", "B"],
         ["Snow is", "black", "red", "white", "green", "C"],
         ["Coal is", "white", "red", "blue", "black", "D"],
         ["Blood is", "red", "blue", "white", "green", "A"]],
        [["The sun is", "yellow", "blue", "black", "green", "A"],
         ["Milk is", "red", "white", "black", "blue", "B"],
         ["Night is", "white", "pink", "dark", "green", "C"]]),
}


def write_toy_mmlu(folder):
    """The Hendrycks layout: {dev,test}/<subject>_{dev,test}.csv, no header."""
    for split in ("dev", "test"):
        (folder / split).mkdir(parents=True, exist_ok=True)
    for subject, (dev, test) in TOY.items():
        for split, rows in (("dev", dev), ("test", test)):
            with open(folder / split / f"{subject}_{split}.csv", "w", newline="") as f:
                csv.writer(f, lineterminator="\n").writerows(rows)
    return folder


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    path = str(write_toy_mmlu(tmp_path_factory.mktemp("mmlu"))) if WORLD.is_root else None
    return WORLD.bcast(path)


@pytest.fixture(scope="module")
def mmlu():
    if not (MMLU / "test").is_dir():
        pytest.skip(f"{MMLU} is absent (the real MMLU data lives in ../shared)")
    return MMLU


@pytest.fixture(scope="module")
def tokenizer():
    with ModelFile(DEMO) as mf:
        return Tokenizer(*mf.tokenizer())


@pytest.fixture(scope="module")
def tiny(model_dir):
    """TINY with random float32 weights and the demo's tokenizer (root writes, all get it)."""
    path = model_dir / "tiny-eval-f32.h5"
    if WORLD.is_root and not path.exists():
        with ModelFile(DEMO) as mf:
            blob = mf.tokenizer()
        write_model(path, TINY, random_weights(TINY, 5).items(), quant="f32", tokenizer=blob)
    WORLD.barrier()
    return path


def shared_path(tmp_path, name):
    """A path that every rank agrees on (each rank has its own tmp_path)."""
    return WORLD.bcast(str(tmp_path / name) if WORLD.is_root else None)


def without_timings(results):
    """Results minus what legitimately changes between runs (times, run conditions)."""
    subjects = {name: {k: v for k, v in s.items() if k != "seconds"}
                for name, s in results["subjects"].items()}
    return {**{k: v for k, v in results.items() if k not in ("runs", "subjects")},
            "subjects": subjects}


def interrupt_at(target):
    """A hook that stops the run (as Ctrl-C would) when called with `target`."""
    def hook(*where):
        if where == target:
            raise KeyboardInterrupt
    return hook


def root_reads(path):
    """Root's reading of a JSON file, on every rank (other ranks may get there first)."""
    return WORLD.bcast(json.loads(open(path).read()) if WORLD.is_root else None)


class Steps:
    """A progress object that counts what it is told."""

    def __init__(self):
        self.total, self.note, self.steps = None, None, 0

    def start(self, total, note=None):
        self.total, self.note = total, note

    def step(self, label):
        self.steps += 1


# --- data and prompts (pure) ----------------------------------------------------------------
def test_read_questions_keeps_commas_quotes_and_newlines(toy):
    questions = evaluate.read_questions(f"{toy}/test/toy_arithmetic_test.csv")
    assert len(questions) == 4
    assert questions[1] == Question("What is 7, plus 7?", ("14", "15", "0", "1"), "A")
    assert questions[2].question == 'Say "eight"\nplus eight'


def test_prompt_is_the_hendrycks_format():
    dev = [Question("2 + 2 = ?", ("4", "5", "6", "7"), "A")]
    q = Question("6 + 6 = ?", ("10", "11", "12", "13"), "C")
    assert evaluate.prompt_text("high_school_math", dev, q, 1) == (
        "The following are multiple choice questions (with answers) about high school math."
        "\n\n2 + 2 = ?\nA. 4\nB. 5\nC. 6\nD. 7\nAnswer: A\n\n"
        "6 + 6 = ?\nA. 10\nB. 11\nC. 12\nD. 13\nAnswer:")


def test_choice_tokens_are_what_follows_answer_in_a_real_prompt(tokenizer, toy):
    tokens = evaluate.choice_tokens(tokenizer)
    # The 512-token vocabulary has '▁A' and '▁B' but spells ' C' as '▁', 'C'.
    assert tokens == {"A": [422], "B": [377], "C": [456, 506], "D": [456, 502]}
    dev, test = evaluate.read_subject(toy, "toy_arithmetic", 2)
    text = evaluate.prompt_text("toy_arithmetic", dev, test[1], 2)
    for letter, ids in tokens.items():
        assert tokenizer.encode(text + " " + letter) == tokenizer.encode(text) + ids


def test_fewer_shots_when_the_prompt_does_not_fit(tokenizer, toy):
    dev, test = evaluate.read_subject(toy, "toy_colours", 5)
    lengths = [len(tokenizer.encode(evaluate.prompt_text("toy_colours", dev, test[0], k)))
               for k in range(6)]
    budget = lengths[3] + 1                  # three shots fit, four do not
    prompt = evaluate.build_prompt(tokenizer, "toy_colours", dev, test[0], 5, budget)
    assert (prompt.shots, prompt.truncated, len(prompt.ids)) == (3, False, lengths[3])
    cut = evaluate.build_prompt(tokenizer, "toy_colours", dev, test[0], 5, lengths[0] - 4)
    assert cut.truncated and cut.shots == 0 and len(cut.ids) == lengths[0] - 4
    assert cut.ids[0] == tokenizer.bos_id and cut.ids[-1] == prompt.ids[-1]


def test_five_shots_do_not_fit_tinystories_context_and_the_count_is_recorded(tokenizer, mmlu):
    subject = "high_school_geography"
    dev, test = evaluate.read_subject(mmlu, subject, 5, limit=5)
    budget = evaluate.prompt_budget(256, evaluate.choice_tokens(tokenizer))
    for q in test:
        p = evaluate.build_prompt(tokenizer, subject, dev, q, 5, budget)
        assert p.shots < 5 and len(p.ids) <= budget
        if not p.truncated:   # the count is the largest that fits
            longer = evaluate.prompt_text(subject, dev, q, p.shots + 1)
            assert len(tokenizer.encode(longer)) > budget


def test_subjects_and_data_folder_errors(toy, tmp_path):
    assert evaluate.list_subjects(toy) == ["toy_arithmetic", "toy_colours"]
    with pytest.raises(DllmError, match="did you mean toy_colours"):
        evaluate.select_subjects(["toy_arithmetic", "toy_colours"], ["toy_colors"])
    with pytest.raises(DllmError, match="not found"):
        evaluate.list_subjects(tmp_path / "nowhere")
    with pytest.raises(DllmError, match="not an MMLU data folder"):
        evaluate.list_subjects(tmp_path)
    with pytest.raises(DllmError, match="--shots 6 needs 6 dev questions"):
        evaluate.read_subject(toy, "toy_colours", 6)
    bad = tmp_path / "bad.csv"
    bad.write_text("question,a,b,c,d,E\n")
    with pytest.raises(DllmError, match="row 1"):
        evaluate.read_questions(bad)


def test_bad_data_files_give_one_error_naming_the_file(tmp_path):
    (tmp_path / "test").mkdir()
    test = tmp_path / "test" / "s_test.csv"
    test.write_text("q,a,b,c,d,A\n")
    with pytest.raises(DllmError, match=r"MMLU file not found: .*dev/s_dev\.csv"):
        evaluate.read_subject(tmp_path, "s", 5)          # test/ without dev/
    assert evaluate.read_subject(tmp_path, "s", 0)[1][0].answer == "A"   # zero-shot needs none
    test.write_bytes("caf\u00e9,a,b,c,d,A\n".encode("latin-1"))
    with pytest.raises(DllmError, match=r"s_test\.csv is not UTF-8 text"):
        evaluate.read_questions(test)
    test.write_text('"' + "x" * 200_000 + '",a,b,c,d,A\n')   # over csv's field size limit
    with pytest.raises(DllmError, match=r"s_test\.csv is not a readable CSV file"):
        evaluate.read_questions(test)


def test_real_mmlu_layout(mmlu):
    subjects = evaluate.list_subjects(mmlu)
    assert len(subjects) == 57 and "abstract_algebra" in subjects
    dev, test = evaluate.read_subject(mmlu, "abstract_algebra", 5)
    assert len(dev) == 5 and len(test) == 100 and dev[0].answer == "B"


def test_replay_chain_rebuilds_the_cache_a_resumed_prompt_reads():
    # Prompt 0 computed [0, 30); 1 and 2 shared 50 ids with their predecessors; 3 shared
    # only 30 (fewer shots), so it rewrote [30, ..); 4 and 5 share 60.
    starts = [0, 50, 50, 30, 60, 60]
    assert evaluate.replay_chain(starts, 5) == [0, 3]
    assert evaluate.replay_chain(starts, 3) == [0]
    assert evaluate.replay_chain(starts, 0) == [] and evaluate.replay_chain(starts, 6) == []
    prompts = [[1, 5, 6, 7], [1, 5, 6, 8], [1, 5, 9], [1, 5, 9]]
    assert evaluate.prompt_starts(prompts) == [0, 3, 2, 2]   # a repeat reruns its last id
    assert evaluate.prompt_starts(prompts, reuse_prefix=False) == [0, 0, 0, 0]


def test_perplexity_windows_follow_the_reference_method():
    windows = evaluate.perplexity_windows(list(range(10, 21)), 5, 1)   # 11 ids, chunks of 4
    assert windows == [[1, 10, 11, 12, 13], [1, 14, 15, 16, 17], [1, 18, 19, 20]]
    assert sum(len(w) - 1 for w in windows) == 11


# --- comparing (pure) -------------------------------------------------------------------------
def fake_results(correct_by_subject, settings=None):
    subjects = {}
    for name, flags in correct_by_subject.items():
        questions = [{"index": i, "answer": "A", "prediction": "A" if c else "B", "correct": c,
                      "logprobs": [-1.0 if c else -2.0, -1.5, -3.0, -3.0], "shots": 5,
                      "truncated": False}
                     for i, c in enumerate(flags)]
        subjects[name] = evaluate.subject_record(questions, 0.0, 0)
    return {"kind": evaluate.RESULTS_KIND, "settings": settings or {}, "subjects": subjects,
            **evaluate.summarize(subjects)}


def test_summary_micro_and_macro():
    r = fake_results({"a": [True, False, False, False], "b": [True, True]})
    assert r["micro_avg"] == pytest.approx(3 / 6) and r["macro_avg"] == pytest.approx(0.625)


def test_compare_gives_paired_difference_interval_and_subject_changes():
    a = fake_results({"s1": [True] * 5 + [False] * 5, "s2": [True, False]}, {"sync": "f32"})
    b = fake_results({"s1": [True] * 3 + [False] * 7, "s2": [True, True]}, {"sync": "q80"})
    r = evaluate.compare_mmlu(a, b)
    d = np.array([0, 0, 0, -1, -1, 0, 0, 0, 0, 0, 0, 1], dtype=float)
    assert r["questions"] == 12 and r["difference"] == pytest.approx(d.mean())
    se = d.std(ddof=1) / math.sqrt(12)
    assert r["ci95"] == pytest.approx([d.mean() - 1.96 * se, d.mean() + 1.96 * se])
    assert (r["only_a_correct"], r["only_b_correct"]) == (2, 1)
    assert r["mcnemar_p"] == pytest.approx(1.0)
    assert r["agreement"] == pytest.approx(9 / 12)
    assert [s["subject"] for s in r["subjects"]] == ["s2", "s1"]
    assert r["subjects"][0]["change"] == pytest.approx(0.5)
    assert r["settings_differ"] == {"sync": ["f32", "q80"]}
    same = evaluate.compare_mmlu(a, a)
    assert same["difference"] == 0 and same["agreement"] == 1 and same["logprob_max_abs_diff"] == 0


def test_results_file_of_other_settings_or_kind_is_never_overwritten(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(evaluate.new_results({"shots": 5}, {"A": [1]})))
    assert evaluate.load_results(path, {"shots": 5})["settings"] == {"shots": 5}
    with pytest.raises(DllmError, match="shots 5, this run has 3"):
        evaluate.load_results(path, {"shots": 3})
    path.write_text('{"perplexity": 3.0}')
    with pytest.raises(DllmError, match="not a dllm MMLU results file"):
        evaluate.load_results(path, {"shots": 5})
    assert evaluate.load_results(tmp_path / "new.json", {"shots": 5}) is None


@pytest.mark.parametrize("change,why", [
    (lambda r: r.pop("runs"), '"runs" is missing'),
    (lambda r: r.update(subjects=[]), '"subjects" is not a JSON object'),
    (lambda r: r["subjects"]["s"].pop("questions"), "subject s: it has no list of questions"),
    (lambda r: r["subjects"]["s"]["questions"][0].update(logprobs=[1]), "not 4 numbers"),
    (lambda r: r["in_progress"].update(t={"questions": [], "seconds": 0}), "tokens_forwarded"),
])
def test_a_damaged_results_file_is_refused_in_one_line(tmp_path, change, why):
    results = evaluate.new_results({"shots": 5}, {"A": [1]})
    results["subjects"] = fake_results({"s": [True, False]})["subjects"]
    change(results)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(results))
    with pytest.raises(DllmError, match="is not a dllm MMLU results file: .*" + why):
        evaluate.load_results(path, {"shots": 5})


@pytest.mark.parametrize("data,why", [
    ([1, 2], "not a dllm MMLU or perplexity results file: it holds an array"),
    ({"kind": evaluate.RESULTS_KIND}, 'not a dllm MMLU results file: "settings" is missing'),
    ({"kind": evaluate.RESULTS_KIND, "settings": {}, "subjects": {"s": {"n": 1}}},
     "not a dllm MMLU results file: subject s: it has no list of questions"),
    ({"perplexity": "x"}, 'not a dllm perplexity results file: "perplexity" is not a number'),
    ({"kind": evaluate.PERPLEXITY_KIND, "version": 1, "settings": {}, "runs": [],
      "window_nll": [1.0], "windows": 2, "seconds": 1.0},
     r"not a dllm perplexity results file: the run is unfinished \(1 of 2 windows\)"),
])
def test_compare_names_a_file_that_is_not_results(data, why):
    with pytest.raises(DllmError, match="x.json is " + why):
        evaluate.check_results(data, "x.json")
    good = fake_results({"s": [True]})
    assert evaluate.check_results(good, "a.json") == "mmlu"
    assert evaluate.check_results({"perplexity": 3.0, "mean_nll": 1.1, "tokens_scored": 9},
                                  "p.json") == "perplexity"


def test_perplexity_out_never_replaces_mmlu_results(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(fake_results({"s": [True]})))
    with pytest.raises(DllmError, match="holds MMLU results"):
        evaluate.load_perplexity(path, {"window": 32})
    path.write_text('{"mine": 1}')
    with pytest.raises(DllmError, match="not a dllm perplexity results file"):
        evaluate.load_perplexity(path, {"window": 32})


# --- scoring (collective) --------------------------------------------------------------------
@pytest.mark.mpi
def test_mmlu_logprobs_at_n_ranks_equal_one_rank(mmlu):
    world = dllm.load(DEMO, sync="f32")
    alone = dllm.load(DEMO, Comm.self_comm(), sync="f32")
    runs = [evaluate.run_mmlu(m, mmlu, REAL_SUBJECTS, shots=5, limit=3) for m in (world, alone)]
    ok = True
    if WORLD.is_root:
        lp = [np.array([q["logprobs"] for s in REAL_SUBJECTS
                        for q in r["subjects"][s]["questions"]]) for r in runs]
        ok = lp[0].shape == (6, 4) and relative_error(lp[0], lp[1]) <= 1e-5
    assert all_ranks(ok)


@pytest.mark.mpi
def test_mmlu_choices_agree_with_float_reference(tiny, mmlu):
    model = dllm.load(tiny, sync="f32")
    results = evaluate.run_mmlu(model, mmlu, REAL_SUBJECTS[:1], shots=5, limit=3)
    ok = True
    if WORLD.is_root:
        weights = random_weights(TINY, 5)
        tokens = results["choice_tokens"]
        subject = REAL_SUBJECTS[0]
        dev, test = evaluate.read_subject(mmlu, subject, 5, limit=3)
        budget = evaluate.prompt_budget(TINY.max_seq_len, tokens)
        for q, record in zip(test, results["subjects"][subject]["questions"]):
            ids = evaluate.build_prompt(model.tokenizer, subject, dev, q, 5, budget).ids
            expected = []
            for letter in evaluate.LETTERS:
                c = tokens[letter]
                logp = evaluate.log_softmax(reference_logits(weights, TINY, ids + c[:-1]))
                expected.append(sum(logp[len(ids) - 1 + j, t] for j, t in enumerate(c)))
            ok = ok and record["prediction"] == "ABCD"[int(np.argmax(expected))]
            ok = ok and relative_error(record["logprobs"], expected) <= 1e-5
    assert all_ranks(ok)


@pytest.mark.mpi
def test_prefix_kv_reuse_gives_the_scores_of_full_prompts(toy):
    model = dllm.load(DEMO, sync="f32", prefill_chunk=16)
    prompts = tokens = None
    if WORLD.is_root:
        tokens = evaluate.choice_tokens(model.tokenizer)
        dev, test = evaluate.read_subject(toy, "toy_arithmetic", 5)
        built = [evaluate.build_prompt(model.tokenizer, "toy_arithmetic", dev, q, 5, 255)
                 for q in test + test[:1]]   # the last prompt repeats the first
        prompts = [p.ids for p in built]
    reused, forwarded_reused = evaluate.score_prompts(model, prompts, tokens, reuse_prefix=True)
    full, forwarded_full = evaluate.score_prompts(model, prompts, tokens, reuse_prefix=False)
    ok = forwarded_reused < forwarded_full / 2
    if WORLD.is_root:
        ok = ok and all(p.shots >= 3 for p in built)   # a long shared prefix
        ok = ok and relative_error(reused, full) <= 1e-5
    assert all_ranks(ok)


@pytest.mark.mpi
def test_resume_after_interruption_loses_nothing(toy, tmp_path):
    subjects = ["toy_arithmetic", "toy_colours"]
    model = dllm.load(DEMO, sync="q80")
    straight = evaluate.run_mmlu(model, toy, subjects, out=shared_path(tmp_path, "straight.json"))
    out = shared_path(tmp_path, "resumed.json")

    def interrupt(subject):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate.run_mmlu(model, toy, subjects, out=out, after_subject=interrupt)
    saved = root_reads(out)
    assert all_ranks(list(saved["subjects"]) == subjects[:1])
    resumed = evaluate.run_mmlu(model, toy, subjects, out=out)
    ok = True
    if WORLD.is_root:
        ok = without_timings(resumed) == without_timings(straight)
        ok = ok and json.loads(open(out).read()) == resumed
        ok = ok and [r["subjects_run"] for r in resumed["runs"]] == [subjects, subjects[1:]]
        ok = ok and resumed["subjects"][subjects[0]] == saved["subjects"][subjects[0]]
    assert all_ranks(ok)


@pytest.mark.mpi
def test_resume_in_the_middle_of_a_subject_skips_the_questions_scored(toy, tmp_path):
    subjects = ["toy_arithmetic", "toy_colours"]
    model = dllm.load(DEMO, sync="q80")
    straight = evaluate.run_mmlu(model, toy, subjects, out=shared_path(tmp_path, "straight.json"))
    out = shared_path(tmp_path, "resumed.json")
    with pytest.raises(KeyboardInterrupt):   # after the third of four questions
        evaluate.run_mmlu(model, toy, subjects, out=out, checkpoint_every=0,
                          after_question=interrupt_at(("toy_arithmetic", 2)))
    saved = root_reads(out)
    assert all_ranks(saved["subjects"] == {} and
                     len(saved["in_progress"]["toy_arithmetic"]["questions"]) == 3)
    steps, restarted = Steps(), dllm.load(DEMO, sync="q80")   # a new process: an empty cache
    resumed = evaluate.run_mmlu(restarted, toy, subjects, out=out, progress=steps)
    ok = steps.total == steps.steps == 4 and "3 question(s) of toy_arithmetic" in steps.note
    if WORLD.is_root:   # the KV cache was rebuilt as the first run left it: identical floats
        ok = ok and without_timings(resumed) == without_timings(straight)
        ok = ok and json.loads(open(out).read()) == resumed and resumed["in_progress"] == {}
        ok = ok and resumed["runs"][1]["questions_resumed"] == {"toy_arithmetic": 3}
    assert all_ranks(ok)


@pytest.mark.mpi
def test_perplexity_resumes_mid_text_to_the_identical_result(tmp_path):
    model = dllm.load(DEMO, sync="q80")
    text = "Once upon a time there was a little girl named Lily. She liked to play.\n" * 3
    ids = model.tokenizer.encode(text, bos=False) if WORLD.is_root else None   # root's text
    windows = -(-WORLD.bcast(len(ids) if WORLD.is_root else None) // 15)
    straight = evaluate.perplexity(model, ids, 16)
    out = shared_path(tmp_path, "ppl.json")
    with pytest.raises(KeyboardInterrupt):
        evaluate.perplexity(model, ids, 16, out=out, checkpoint_every=0,
                            after_window=interrupt_at((1,)))
    saved = root_reads(out)
    assert all_ranks(windows > 3 and len(saved["window_nll"]) == 2 and "perplexity" not in saved)
    steps = Steps()
    resumed = evaluate.perplexity(model, ids, 16, progress=steps, out=out)
    ok = steps.total == steps.steps == windows - 2
    if WORLD.is_root:   # the NLL of every window, summed in order: the identical number
        ok = ok and resumed["perplexity"] == straight["perplexity"]
        ok = ok and resumed["window_nll"] == straight["window_nll"]
        ok = ok and json.loads(open(out).read()) == resumed
    again = Steps()   # finished: given back as it is, nothing recomputed
    finished = evaluate.perplexity(model, ids, 16, progress=again, out=out)
    ok = ok and again.steps == 0 and (not WORLD.is_root or finished == resumed)
    assert all_ranks(ok)
    with pytest.raises(DllmError, match="holds a run with window 16, this run has 12"):
        evaluate.perplexity(model, ids, 12, out=out)


# --- perplexity of the real models --------------------------------------------------------------
@pytest.mark.parametrize("name", ["tinystories-1m", "tinystories-6m"])
def test_perplexity_matches_reference_json(name, model_dir):
    folder = SHARED / "models" / name
    if not (folder / "hf").is_dir():
        pytest.skip(f"{folder} is absent (../shared holds the real models)")
    reference = json.loads((folder / "reference.json").read_text())["valid_perplexity"]
    path = model_dir / f"{name}-f32.h5"
    if not path.exists():
        convert_hf(folder / "hf", path, quant="f32", log=lambda m: None)
    model = dllm.load(path, Comm.self_comm(), sync="f32", prefill_chunk=256)  # one pass a window
    text = (folder / reference["file"]).resolve().read_text(encoding="utf-8")
    result = evaluate.perplexity(model, model.tokenizer.encode(text, bos=False), 256)
    assert result["tokens_scored"] == reference["tokens_scored"]
    assert result["windows"] == reference["windows"]
    assert abs(result["perplexity"] / reference["perplexity"] - 1) < 0.01
