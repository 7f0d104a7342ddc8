"""python -m dllm.bench end to end under mpirun: the JSON line, its conditions, the table."""
import json
import subprocess
import sys

import pytest

from dllm import backend
from dllm import demo_model

from test_cli import mpirun_command, TIMEOUT


def run_bench(n, *args):
    cmd = mpirun_command(n) + [sys.executable, "-m", "dllm.bench", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)


@pytest.mark.parametrize("scheme", ["slices", "reduce"])
def test_bench_writes_one_json_line_per_run(tmp_path, scheme):
    out = tmp_path / "runs.jsonl"
    for n, kernels in ((1, "numpy"), (2, backend.choose())):
        result = run_bench(n, "--model", demo_model(), "--prompt-len", 8, "--decode-tokens",
                           4, "--sync-scheme", scheme, "--out", out, "--kernels", kernels)
        assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["conditions"]["world_size"] for r in records] == [1, 2]
    assert [r["conditions"]["kernels"] for r in records] == ["numpy", backend.choose()]
    one, two = records
    assert one["bytes_per_token"]["received"] == 0 < two["bytes_per_token"]["received"]
    for r in records:
        assert r["conditions"]["sync_scheme"] == scheme and r["prompt_tokens"] == 8
        assert r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0
        assert 0 < r["decode_step_ms"]["min"] <= r["decode_step_ms"]["median"]
        assert r["memory_per_rank"]["peak_rss"]["min"] > r["memory_per_rank"]["weights"]["max"]
        assert set(r["over_ranks"]) >= {"total_ms", "sync_ms", "inference_ms"}
    table = subprocess.run([sys.executable, "-m", "dllm.bench", "table", str(out)],
                           capture_output=True, text=True, timeout=TIMEOUT)
    assert table.returncode == 0 and len(table.stdout.splitlines()) == 3


def test_bench_needs_a_model_or_a_preset():
    result = run_bench(1, "--decode-tokens", 2)
    assert result.returncode == 1 and "exactly one of --model and --preset" in result.stderr
    assert "Traceback" not in result.stderr
