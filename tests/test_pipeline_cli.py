"""--parallel pipeline end to end under mpirun: generate, bench, bench compare.

Serial suite (it launches mpirun itself).
"""
import json
import subprocess
import sys

from dllm import demo_model

from test_cli import TIMEOUT, assert_one_clear_error, mpirun_command, run_generate


def run_bench(n, *args):
    cmd = mpirun_command(n) + [sys.executable, "-m", "dllm.bench", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)


def test_generate_pipeline_gives_the_centralized_text(tmp_path):
    stats = tmp_path / "stats.json"
    alone = run_generate(1, "--prompt", "Once upon a time", "--steps", 20, "--sync", "f32",
                         "--quiet")
    pipeline = run_generate(2, "--prompt", "Once upon a time", "--steps", 20, "--sync", "f32",
                            "--parallel", "pipeline", "--stats-json", stats)
    assert pipeline.returncode == 0, pipeline.stderr
    assert pipeline.stdout == alone.stdout
    report = json.loads(stats.read_text())
    assert report["conditions"]["sync_scheme"] == "pipeline"
    assert report["conditions"]["world_size"] == 2 and report["generated_tokens"] == 20


def test_generate_pipeline_errors_are_one_line(tmp_path):
    assert_one_clear_error(run_generate(2, "--parallel", "pipeline", "--sync-scheme", "reduce"),
                           "--sync-scheme reduce applies to --parallel tensor only")
    (tmp_path / "p.json").write_text('{"devices": [{"memory": "1GB"}]}')
    assert_one_clear_error(run_generate(2, "--parallel", "pipeline", "--profile",
                                        tmp_path / "p.json"), "1 devices but the job has 2")


def test_bench_pipeline_line(tmp_path):
    out = tmp_path / "runs.jsonl"
    result = run_bench(2, "--model", demo_model(), "--parallel", "pipeline", "--prompt-len", 8,
                       "--decode-tokens", 4, "--out", out)
    assert result.returncode == 0, result.stderr
    record = json.loads(out.read_text())
    assert record["conditions"]["sync_scheme"] == "pipeline"
    assert record["bytes_per_token"]["received"] > 0 and record["decode_tokens_per_s"] > 0


def test_bench_refuses_a_rank_without_layers_in_one_line(tmp_path):
    """It used to divide by the rank's empty weights (ZeroDivisionError)."""
    (tmp_path / "p.json").write_text('{"devices": [{"memory": "1GB"}, {"memory": "1GB"}], '
                                     '"layers": [4, 0]}')
    result = run_bench(2, "--model", demo_model(), "--parallel", "pipeline", "--profile",
                       tmp_path / "p.json", "--prompt-len", 4, "--decode-tokens", 2)
    lines = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("dllm.bench: error: rank 1 "), result.stderr
    assert "would hold none of the model's 4 layers" in lines[0]


def test_bench_compare_reports_every_mode(tmp_path):
    out = tmp_path / "compare.jsonl"
    result = run_bench(2, "compare", "--model", demo_model(), "--sequences", "1,2",
                       "--decode-tokens", 3, "--sync", "f32", "--out", out)
    assert result.returncode == 0, result.stderr
    assert [line.split()[0] for line in result.stdout.splitlines()] == [
        "mode", "centralized", "tensor", "pipeline"]
    record = json.loads(out.read_text())
    modes = {m["mode"]: m for m in record["modes"]}
    assert modes["centralized"]["world_size"] == 1 and modes["pipeline"]["world_size"] == 2
    for name in ("tensor", "pipeline"):
        m = modes[name]
        assert m["logits_rel_error"] <= 1e-5 and m["argmax_agreement"] == 1.0
        assert set(m["tokens_per_s"]) == {"1", "2"} and all(v > 0 for v in m["tokens_per_s"].values())
        assert all(r["received"] > 0 for r in m["per_rank"])
        assert m["conditions"]["layout"]
    assert modes["pipeline"]["conditions"]["layout"] == {"layers_per_rank": [2, 2]}
    assert "0/0 " not in result.stdout      # the demo's weights are under 1 MB per rank
    assert modes["pipeline"]["per_rank"][0]["weights"] > modes["pipeline"]["per_rank"][1]["weights"]
    assert all(r["received"] == 0 for r in modes["centralized"]["per_rank"])


def test_bench_compare_bad_modes_are_one_line():
    result = run_bench(2, "compare", "--model", demo_model(), "--modes", "tensor,diagonal")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("dllm.bench: error: --modes must name some of")
