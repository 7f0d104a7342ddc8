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


def test_bench_takes_one_of_model_and_preset():
    result = run_bench(1, "--model", demo_model(), "--preset", "llama2-7b")
    assert result.returncode == 1 and "one of --model and --preset, not both" in result.stderr
    assert "Traceback" not in result.stderr


def test_repeats_report_their_spread_and_load_and_the_cache_fits_the_run(tmp_path):
    out = tmp_path / "runs.jsonl"
    result = run_bench(2, "--prompt-len", 6, "--decode-tokens", 3, "--warmup", 1,
                       "--repeat", 3, "--out", out)     # the demo model, as dllm.generate
    assert result.returncode == 0, result.stderr
    r = json.loads(out.read_text())
    assert len(r["repeats"]) == 3 and all(x["load_average_1min"] for x in r["repeats"])
    totals = sorted(x["ms_per_token"]["total"] for x in r["repeats"])
    assert r["ms_per_token"]["total"] == totals[1]            # the median repeat
    assert r["spread_over_repeats"]["total"]["min"] == totals[0]
    assert r["conditions"]["max_seq_len"] == 6 + 1 + 3         # not the model's 256
    c = r["model_config"]
    assert r["memory_per_rank"]["kv_cache"]["max"] == (
        2 * c["n_layers"] * (c["n_kv_heads"] // 2) * 10 * (c["dim"] // c["n_heads"]) * 4)


def test_table_groups_setups_warns_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "runs.jsonl"
    for n, sync in ((1, "q80"), (2, "q80"), (2, "f32")):
        result = run_bench(n, "--prompt-len", 4, "--decode-tokens", 2, "--sync", sync,
                           "--out", out)
        assert result.returncode == 0, result.stderr
    table = subprocess.run([sys.executable, "-m", "dllm.bench", "table", str(out),
                            "--plot-dir", str(tmp_path / "plots")],
                           capture_output=True, text=True, timeout=TIMEOUT)
    assert table.returncode == 0, table.stderr
    assert "warning: the runs are of 2 different setups" in table.stderr
    assert table.stdout.count("# ") == 2 and "sync q80" in table.stdout
    written = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert f"wrote {len(written)} plot(s) in" in table.stderr
    assert any(name.endswith("q80-tensor-speedup.png") for name in written)
    assert not any("None" in name for name in written)
    assert sum(name.endswith("-time.png") for name in written) == 2
