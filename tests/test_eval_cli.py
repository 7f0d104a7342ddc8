"""python -m dllm.eval end to end under mpirun: mmlu (with resuming), perplexity, compare, and
every bad input giving one clear error line; the progress lines of a log; jobs/eval.sbatch.
Serial suite (it launches mpirun itself); the demo model and a toy MMLU folder, so nothing
here needs ../shared."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dllm import evaluate
from dllm.eval import Progress
from dllm import demo_model
from test_cli import mpirun_command
from test_eval import fake_results, write_toy_mmlu

ROOT = Path(__file__).resolve().parents[1]

TIMEOUT = 90
TEXT = ("Once upon a time there was a little girl named Lily. She liked to play in the park "
        "with her dog. One day the dog ran away and Lily was sad.\n\n" * 4)


def run_eval(n, *args):
    cmd = mpirun_command(n) + [sys.executable, "-m", "dllm.eval", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def assert_one_clear_error(result, *fragments):
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith("dllm.eval: error: "), result.stderr
    usage = lines[0].endswith("(see --help)")     # argparse's convention: a usage error is 2
    assert result.returncode == (2 if usage else 1), result.stdout + result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy_mmlu(tmp_path_factory.mktemp("mmlu"))


def demo_results(world_size, **changes):
    """A results file as `mmlu --data toy` with the demo model would start it."""
    settings = {"split": "test", "shots": 5, "limit": None, "model": demo_model().name,
                "quant": "q40", "sync": "q80", "sync_scheme": "slices",
                "world_size": world_size, "prefill_chunk": 64, "max_seq_len": 256}
    return {**evaluate.new_results(settings, {"A": [422], "B": [377], "C": [456, 506],
                                              "D": [456, 502]}), **changes}


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """Damaged results files and MMLU folders."""
    folder = tmp_path_factory.mktemp("bad")
    files = {"array.json": [1, 2], "kindonly.json": {"kind": evaluate.RESULTS_KIND},
             "noquestions.json": {"kind": evaluate.RESULTS_KIND, "settings": {},
                                  "subjects": {"s": {"n": 1, "correct": 1}}},
             "pplx.json": {"perplexity": "x"}, "good.json": fake_results({"s": [True]})}
    for name, data in files.items():
        (folder / name).write_text(json.dumps(data))
    row = "q,a,b,c,d,A\n"
    tests = {"nodev": row.encode(), "latin": "caf\u00e9,a,b,c,d,A\n".encode("latin-1"),
             "bigfield": ('"' + "x" * 200_000 + '",a,b,c,d,A\n').encode()}   # > csv's limit
    for name, test in tests.items():
        (folder / name / "test").mkdir(parents=True)
        (folder / name / "test" / "x_test.csv").write_bytes(test)
        if name != "nodev":
            (folder / name / "dev").mkdir()
            (folder / name / "dev" / "x_dev.csv").write_text(row * 5)
    return folder


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


def test_an_out_that_is_not_results_is_refused_before_the_model_loads(toy, tmp_path):
    # --max-seq-len 100000 exceeds the demo's context: loading would fail, so these errors
    # show that --out was checked first.
    for name, results in (("noruns.json", demo_results(1)), ("nosubjects.json", demo_results(1))):
        results.pop("runs") if name == "noruns.json" else results.update(subjects=[])
        out = tmp_path / name
        out.write_text(json.dumps(results))
        result = run_eval(1, "mmlu", "--data", toy, "--max-seq-len", 100000, "--out", out)
        assert_one_clear_error(result, f"--out {out} is not a dllm MMLU results file",
                               '"runs" is missing' if name == "noruns.json" else
                               '"subjects" is not a JSON object')
        assert json.loads(out.read_text()) == results


def test_perplexity_and_compare_never_replace_mmlu_results(bad, tmp_path):
    out = tmp_path / "mmlu.json"
    out.write_text((bad / "good.json").read_text())
    text = tmp_path / "story.txt"
    text.write_text(TEXT)
    assert_one_clear_error(run_eval(1, "perplexity", "--text", text, "--out", out),
                           "holds MMLU results")
    assert_one_clear_error(run_eval(1, "compare", bad / "good.json", bad / "good.json",
                                    "--out", out), "holds MMLU results", "comparison")
    assert out.read_text() == (bad / "good.json").read_text()


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


def test_pipeline_perplexity_equals_tensor_and_a_finished_out_is_not_recomputed(tmp_path):
    text = tmp_path / "story.txt"
    text.write_text(TEXT)
    figures = {}
    for parallel in ("tensor", "pipeline"):
        out = tmp_path / f"{parallel}.json"
        result = run_eval(2, "perplexity", "--text", text, "--window", 32, "--sync", "f32",
                          "--parallel", parallel, "--out", out)
        assert result.returncode == 0, result.stderr
        figures[parallel] = json.loads(out.read_text())
    assert figures["pipeline"]["settings"]["sync_scheme"] == "pipeline"
    assert figures["pipeline"]["tokens_scored"] == figures["tensor"]["tokens_scored"]
    assert figures["pipeline"]["perplexity"] == pytest.approx(figures["tensor"]["perplexity"],
                                                              rel=1e-6)
    again = run_eval(2, "perplexity", "--text", text, "--window", 32, "--sync", "f32",
                     "--out", tmp_path / "tensor.json")
    assert again.returncode == 0, again.stderr
    assert "not recomputed" in again.stdout
    assert f"perplexity {figures['tensor']['perplexity']:.4f}" in again.stdout
    assert json.loads((tmp_path / "tensor.json").read_text()) == figures["tensor"]
    other = run_eval(2, "perplexity", "--text", text, "--window", 32,
                     "--out", tmp_path / "tensor.json")
    assert_one_clear_error(other, "holds a run with sync 'f32', this run has 'q80'")


@pytest.mark.parametrize("n,args,fragments", [
    (2, ["mmlu", "--data", "/nonexistent/mmlu"], ["MMLU data folder not found"]),
    (2, ["mmlu", "--data", "{toy}", "--subjects", "toy_colors"],
     ["unknown subject 'toy_colors'", "did you mean toy_colours"]),
    (2, ["mmlu", "--data", "{toy}", "--shots", "-1"], ["--shots must be at least 0"]),
    (1, ["mmlu", "--data", "{toy}", "--shots", "6"], ["--shots 6 needs 6 dev questions"]),
    (1, ["mmlu", "--data", "{toy}", "--shots", "five"], ["--shots", "invalid int"]),
    (1, ["mmlu", "--data", "{toy}", "--limit", "0"], ["--limit must be at least 1"]),
    (1, ["mmlu"], ["--data"]),
    (2, ["perplexity", "--text", "/nonexistent.txt"], ["text file not found"]),
    (1, ["perplexity", "--text", "{toy}/test/toy_colours_test.csv", "--window", "1"],
     ["--window must be between 2 and the context of 256"]),
    (1, ["perplexity", "--text", "{toy}/test/toy_colours_test.csv", "--window", "0"],
     ["--window must be between 2 and the context of 256 tokens, got 0"]),
    (1, ["perplexity", "--text", "{toy}/test/toy_colours_test.csv", "--profile", "/no.json"],
     ["profile not found: /no.json"]),
    (2, ["mmlu", "--data", "{bad}/nodev"], ["MMLU file not found", "nodev/dev/x_dev.csv"]),
    (1, ["mmlu", "--data", "{bad}/latin"], ["latin/test/x_test.csv is not UTF-8 text"]),
    (1, ["mmlu", "--data", "{bad}/bigfield"], ["x_test.csv is not a readable CSV file"]),
    (1, ["compare", "/nonexistent-a.json", "/nonexistent-b.json"], ["results file not found"]),
    (1, ["compare", "{bad}/array.json", "{bad}/good.json"],
     ["array.json is not a dllm MMLU or perplexity results file"]),
    (2, ["compare", "{bad}/good.json", "{bad}/kindonly.json"],
     ["kindonly.json is not a dllm MMLU results file", '"settings" is missing']),
    (1, ["compare", "{bad}/noquestions.json", "{bad}/good.json"],
     ["noquestions.json is not a dllm MMLU results file", "no list of questions"]),
    (1, ["compare", "{bad}/pplx.json", "{bad}/pplx.json"],
     ["pplx.json is not a dllm perplexity results file", '"perplexity" is not a number']),
    (1, ["compare", "{bad}/good.json", "{bad}/good.json", "--top", "0"],
     ["--top must be at least 1, got 0"]),
    (1, ["compare", "{bad}/good.json", "{bad}/good.json", "--top", "-1"],
     ["--top must be at least 1, got -1"]),
    (1, [], ["required"]),
])
def test_bad_input_gives_one_clear_error(n, args, fragments, toy, bad):
    result = run_eval(n, *[a.format(toy=toy, bad=bad) for a in args])
    assert_one_clear_error(result, *[f.format(bad=bad) for f in fragments])


def test_refuses_to_overwrite_a_file_that_is_not_mmlu_results(toy, tmp_path):
    out = tmp_path / "notes.json"
    out.write_text('{"mine": 1}\n')
    assert_one_clear_error(run_eval(1, "mmlu", "--data", toy, "--out", out),
                           "not a dllm MMLU results file")
    assert out.read_text() == '{"mine": 1}\n'


# --- progress in a log (what every rank's stderr is under mpirun) -----------------------------
class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_in_a_log_prints_a_line_every_20_seconds_and_per_subject():
    stream, clock = io.StringIO(), Clock()
    progress = Progress(True, "questions", stream, clock=clock)
    progress.start(100, "2 subject(s) already in the results file")
    for i in range(10):
        clock.now += 5.0
        progress.step("anatomy" if i < 6 else "astronomy")
    progress.close()
    assert stream.getvalue().splitlines() == [
        "dllm.eval: continuing: 2 subject(s) already in the results file",
        "dllm.eval: 4/100 questions  0.20 questions/s  ETA 0:08:00  anatomy",   # 20 s
        "dllm.eval: 6/100 questions  0.17 questions/s  ETA 0:09:08  anatomy",   # its end
        "dllm.eval: 10/100 questions  0.20 questions/s  ETA 0:07:30  astronomy"]


# --- the SLURM job ------------------------------------------------------------------------------
def test_eval_job_continues_its_results_file_when_requeued(toy, tmp_path):
    """jobs/eval.sbatch run twice as SLURM would after a requeue (same job id), with an
    srun that runs its command on this machine."""
    job = (ROOT / "jobs" / "eval.sbatch").read_text()
    assert "#SBATCH --requeue" in job and "#SBATCH --open-mode=append" in job
    if not (Path(sys.prefix) / "bin" / "activate").is_file():
        pytest.skip("not running from a virtual environment (the job sources its activate)")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/sh\nwhile [ "${1#-}" != "$1" ]; do shift; done\n'
                                  'exec "$@"\n')   # drop srun's options, run the command
    (bin_dir / "srun").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "DLLM_VENV": sys.prefix,
           "MODEL": str(demo_model()), "DATA": str(toy), "LIMIT": "2", "SYNC": "f32",
           "SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    runs = []
    for subjects in ("toy_colours", "toy_colours toy_arithmetic"):
        runs.append(subprocess.run(["bash", str(ROOT / "jobs" / "eval.sbatch")],
                                   capture_output=True, text=True, timeout=TIMEOUT,
                                   env={**env, "SUBJECTS": subjects}))
        assert runs[-1].returncode == 0, runs[-1].stdout + runs[-1].stderr
    assert "continuing: 1 subject(s)" in runs[1].stderr
    report = json.loads((tmp_path / "dllm-eval-4242.json").read_text())
    assert list(report["subjects"]) == ["toy_colours", "toy_arithmetic"]
    assert [r["subjects_run"] for r in report["runs"]] == [["toy_colours"], ["toy_arithmetic"]]
