"""python -m dllm.generate end to end under mpirun, and every bad input: one clear error line
on root, non-zero exit, no traceback, no hang. Serial suite (it launches mpirun itself)."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from dllm import demo_model

DEMO = demo_model()
TIMEOUT = 90


def mpirun_command(n):
    here = Path(sys.executable).parent / "mpirun"
    launcher = str(here) if here.exists() else shutil.which("mpirun") or shutil.which("mpiexec")
    if launcher is None:
        pytest.skip("no mpirun on PATH")
    return [launcher, "-n", str(n)]


def run_generate(n, *args, timeout=TIMEOUT):
    cmd = mpirun_command(n) + [sys.executable, "-m", "dllm.generate", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def error_lines(result):
    return [line for line in result.stderr.splitlines() if "error" in line.lower()]


def assert_one_clear_error(result, *fragments):
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("dllm.generate: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_demo_model_is_shipped():
    assert DEMO.is_file(), "the embedded demo model is missing from the package"


@pytest.mark.parametrize("n", [1, 2])
def test_generate_end_to_end(n, tmp_path):
    stats = tmp_path / "stats.json"
    result = run_generate(n, "--prompt", "Once upon a time", "--steps", 24,
                          "--stats-json", stats)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Once upon a time")
    assert len(result.stdout.split()) > 8
    report = json.loads(stats.read_text())
    assert report["conditions"]["world_size"] == n
    assert report["prompt_tokens"] == 5 and report["generated_tokens"] == 24
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        assert report[key] > 0
    assert set(report["ms_per_token"]) == {"total", "inference", "sync"}
    assert set(report["bytes_per_token"]) == {"sent", "received"}
    assert "per decoded token" in result.stderr


def test_f32_sync_same_text_on_one_and_two_ranks():
    args = ("--prompt", "Lily and Ben", "--steps", 20, "--temperature", 0.8, "--seed", 3,
            "--sync", "f32", "--quiet")
    one, two = run_generate(1, *args), run_generate(2, *args)
    assert one.returncode == two.returncode == 0
    assert one.stdout == two.stdout and len(one.stdout) > len("Lily and Ben")


def test_threads_and_kernels_give_the_same_text_and_are_recorded(tmp_path):
    """Threads split each matmul's rows (every row computed as with one thread); both
    backends run the demo model to the same greedy text."""
    runs = {}
    for kernels, threads in (("numpy", 1), ("fast", 1), ("fast", 2)):
        if kernels == "fast" and importlib.util.find_spec("numba") is None:
            continue
        stats = tmp_path / f"{kernels}-{threads}.json"
        result = run_generate(1, "--prompt", "Once upon a time", "--steps", 16, "--quiet",
                              "--kernels", kernels, "--threads", threads, "--stats-json", stats)
        assert result.returncode == 0, result.stderr
        conditions = json.loads(stats.read_text())["conditions"]
        assert (conditions["kernels"], conditions["threads_per_rank"]) == (kernels, threads)
        runs[kernels, threads] = result.stdout
    assert len(set(runs.values())) == 1 and len(runs[("numpy", 1)]) > len("Once upon a time")


def test_weights_from_root_cli():
    args = ("--prompt", "Once", "--steps", 10, "--quiet")
    assert run_generate(2, *args, "--weights-from", "root").stdout == \
        run_generate(2, *args).stdout


def test_missing_model_file(tmp_path):
    assert_one_clear_error(run_generate(2, "--model", tmp_path / "nope.h5"), "not found")


def test_truncated_model_file(tmp_path):
    bad = tmp_path / "truncated.h5"
    bad.write_bytes(DEMO.read_bytes()[:DEMO.stat().st_size * 2 // 3])
    assert_one_clear_error(run_generate(2, "--model", bad), "truncated")


def test_corrupt_model_file(tmp_path):
    bad = tmp_path / "corrupt.h5"
    bad.write_bytes(b"this is not a model\n" * 100)
    assert_one_clear_error(run_generate(2, "--model", bad), "not an HDF5 model file")


def test_unknown_format_version(tmp_path):
    bad = tmp_path / "future.h5"
    shutil.copy(DEMO, bad)
    with h5py.File(bad, "r+") as f:
        f.attrs["format_version"] = 99
    assert_one_clear_error(run_generate(2, "--model", bad), "version 99")


def test_world_size_that_cannot_split():
    assert_one_clear_error(run_generate(5, "--steps", 2), "cannot split 4 query heads over 5 ranks")


def test_prompt_longer_than_context():
    assert_one_clear_error(run_generate(2, "--prompt", "Once upon a time " * 10,
                                        "--max-seq-len", 16), "does not fit the context")


@pytest.mark.parametrize("flags,fragment", [
    (("--temperature", "-1"), "--temperature"),
    (("--top-p", "0"), "--top-p"),
    (("--top-p", "1.5"), "--top-p"),
    (("--steps", "0"), "--steps"),
    (("--sync", "f16"), "--sync"),
    (("--max-seq-len", "100000"), "exceeds the model's context"),
    (("--threads", "0"), "--threads must be between 1"),
    (("--kernels", "cuda"), "--kernels"),
])
def test_invalid_arguments(flags, fragment):
    assert_one_clear_error(run_generate(2, *flags), fragment)


def test_no_mpi_is_one_clear_line():
    code = ("import sys; sys.modules['mpi4py'] = None; from dllm.generate import main; "
            "sys.exit(main(['--steps', '2']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert_one_clear_error(result, "MPI is not available", "dllm[mpich]")


def test_model_path_is_a_directory(tmp_path):
    assert_one_clear_error(run_generate(2, "--model", tmp_path), "is a directory")


def test_stats_json_in_missing_directory_fails_before_the_run(tmp_path):
    target = tmp_path / "missing" / "stats.json"
    assert_one_clear_error(run_generate(2, "--stats-json", target), "does not exist")
    assert not target.parent.exists()


def test_stats_json_that_is_a_directory(tmp_path):
    assert_one_clear_error(run_generate(2, "--steps", 2, "--stats-json", tmp_path), "is a directory")
    assert list(tmp_path.iterdir()) == []


def test_dllm_command_verbs_version_and_usage_exit_2(tmp_path):
    """`python -m dllm VERB` runs the verb's module; --version; a command line that does
    not parse exits 2 (argparse's convention), other bad input 1."""
    def dllm(*args):
        return subprocess.run([sys.executable, "-m", "dllm", *map(str, args)],
                              capture_output=True, text=True, timeout=TIMEOUT)
    version = dllm("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"dllm {dllm_version()}"
    assert dllm("inspect", "--version").stdout.strip() == f"dllm {dllm_version()}"
    inspected = dllm("inspect", DEMO)
    assert inspected.returncode == 0 and "dllm format v1" in inspected.stdout
    usage = dllm("inspect", DEMO, "--no-such-flag")
    assert usage.returncode == 2 and usage.stderr.startswith("dllm.inspect: error:")
    assert dllm("inspect", tmp_path / "missing.h5").returncode == 1
    unknown = dllm("frobnicate")
    assert unknown.returncode == 2 and "unknown verb" in unknown.stderr
    text = run_generate(1, "--steps", "x")
    assert text.returncode == 2 and len(error_lines(text)) == 1


def dllm_version():
    import dllm
    return dllm.__version__


def test_star_scheme_same_greedy_text_as_slices():
    """--sync-scheme star (root attends, holds the KV cache and the classifier) generates
    the text of slices, f32 sync, on 2 ranks."""
    args = ("--prompt", "Lily and Ben", "--steps", 24, "--temperature", 0, "--sync", "f32",
            "--quiet")
    slices = run_generate(2, *args, "--sync-scheme", "slices")
    star = run_generate(2, *args, "--sync-scheme", "star")
    assert slices.returncode == star.returncode == 0, star.stderr
    assert star.stdout == slices.stdout and len(star.stdout) > len("Lily and Ben")
