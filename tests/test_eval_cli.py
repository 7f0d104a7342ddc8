"""python -m dllm.eval end to end under mpirun: mmlu (with resuming), perplexity, compare, and
every bad input giving one clear error line. Serial suite (it launches mpirun itself); the
demo model and a toy MMLU folder, so nothing here needs ../shared."""
import json
import os
import subprocess
import sys

import pytest

from test_cli import mpirun_command
from test_eval import write_toy_mmlu

TIMEOUT = 90
TEXT = ("Once upon a time there was a little girl named Lily. She liked to play in the park "
        "with her dog. One day the dog ran away and Lily was sad.\n\n" * 4)


def run_eval(n, *args):
    cmd = mpirun_command(n) + [sys.executable, "-m", "dllm.eval", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def assert_one_clear_error(result, *fragments):
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith("dllm.eval: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy_mmlu(tmp_path_factory.mktemp("mmlu"))


def test_mmlu_on_two_ranks_equals_one_rank_and_compare_says_so(toy, tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    for n, out in ((1, one), (2, two)):
        result = run_eval(n, "mmlu", "--data", toy, "--sync", "f32", "--out", out)
        assert result.returncode == 0, result.stderr
        assert "questions/s" in result.stderr and "ETA" in result.stderr
        assert "micro average" in result.stdout and "toy_colours" in result.stdout
    report = json.loads(two.read_text())
    assert report["settings"]["world_size"] == 2 and report["n_questions"] == 7
    assert {"micro_avg", "macro_avg"} <= set(report)
    question = report["subjects"]["toy_arithmetic"]["questions"][0]
    assert len(question["logprobs"]) == 4 and question["prediction"] in "ABCD"
    compared = run_eval(1, "compare", one, two, "--out", tmp_path / "cmp.json")
    assert compared.returncode == 0, compared.stderr
    assert "B - A = +0.00 points" in compared.stdout
    assert "setting world_size: A 1, B 2" in compared.stdout
    cmp = json.loads((tmp_path / "cmp.json").read_text())
    assert cmp["agreement"] == 1.0 and cmp["logprob_max_rel_diff"] <= 1e-5


def test_mmlu_continues_an_existing_results_file(toy, tmp_path):
    out = tmp_path / "r.json"
    first = run_eval(2, "mmlu", "--data", toy, "--subjects", "toy_colours", "--out", out)
    assert first.returncode == 0, first.stderr
    saved = json.loads(out.read_text())["subjects"]["toy_colours"]
    second = run_eval(2, "mmlu", "--data", toy, "--out", out)
    assert second.returncode == 0, second.stderr
    assert "continuing: 1 subject(s)" in second.stderr
    report = json.loads(out.read_text())
    assert list(report["subjects"]) == ["toy_colours", "toy_arithmetic"]
    assert report["subjects"]["toy_colours"] == saved and len(report["runs"]) == 2
    other = run_eval(1, "mmlu", "--data", toy, "--shots", 2, "--out", out)
    assert_one_clear_error(other, "holds a run with shots 5, this run has 2")
    assert json.loads(out.read_text()) == report   # untouched


def test_perplexity_on_two_ranks(tmp_path):
    text, out = tmp_path / "story.txt", tmp_path / "ppl.json"
    text.write_text(TEXT)
    result = run_eval(2, "perplexity", "--text", text, "--window", 32, "--out", out)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["conditions"]["world_size"] == 2 and report["window"] == 32
    assert report["tokens_scored"] > 50 and report["windows"] == -(-report["tokens_scored"] // 31)
    assert report["perplexity"] > 1 and report["perplexity"] == pytest.approx(
        2.718281828459045 ** report["mean_nll"])
    assert f"perplexity {report['perplexity']:.4f}" in result.stdout


@pytest.mark.parametrize("n,args,fragments", [
    (2, ["mmlu", "--data", "/nonexistent/mmlu"], ["MMLU data folder not found"]),
    (2, ["mmlu", "--data", "{toy}", "--subjects", "toy_colors"],
     ["unknown subject 'toy_colors'", "did you mean toy_colours"]),
    (2, ["mmlu", "--data", "{toy}", "--shots", "-1"], ["--shots must be 0 or more"]),
    (1, ["mmlu", "--data", "{toy}", "--shots", "6"], ["--shots 6 needs 6 dev questions"]),
    (1, ["mmlu", "--data", "{toy}", "--shots", "five"], ["--shots", "invalid int"]),
    (1, ["mmlu", "--data", "{toy}", "--limit", "0"], ["--limit must be at least 1"]),
    (1, ["mmlu"], ["--data"]),
    (2, ["perplexity", "--text", "/nonexistent.txt"], ["text file not found"]),
    (1, ["perplexity", "--text", "{toy}/test/toy_colours_test.csv", "--window", "1"],
     ["--window must be between 2 and the context of 256"]),
    (1, ["compare", "/nonexistent-a.json", "/nonexistent-b.json"], ["results file not found"]),
    (1, [], ["required"]),
])
def test_bad_input_gives_one_clear_error(n, args, fragments, toy):
    result = run_eval(n, *[a.format(toy=toy) for a in args])
    assert_one_clear_error(result, *fragments)


def test_refuses_to_overwrite_a_file_that_is_not_mmlu_results(toy, tmp_path):
    out = tmp_path / "notes.json"
    out.write_text('{"mine": 1}\n')
    assert_one_clear_error(run_eval(1, "mmlu", "--data", toy, "--out", out),
                           "not a dllm MMLU results file")
    assert out.read_text() == '{"mine": 1}\n'
