"""The planner: cost model on synthetic numbers, NSGA-II pieces, baselines, the CLI.

Serial (pure functions; the end-to-end test launches mpirun itself).
"""
import importlib.util
import itertools
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from dllm import demo_model
from dllm.config import ModelConfig
from dllm.errors import DllmError
from dllm.plan import (CostModel, Plan, baseline_note, check_table, crowding_distance,
                       greedy_memory_plan, min_latency_plan, nondominated_sort, nsga2, recommend,
                       search)
from dllm.placement import stage_bytes
from dllm.profile import Profile, as_profile

from test_cli import TIMEOUT, mpirun_command

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "profiles" / "laptops-example.json"
SMALL = ModelConfig(dim=64, hidden_dim=128, n_layers=6, n_heads=4, n_kv_heads=4,
                    vocab_size=100, max_seq_len=16)
LLAMA7B = ModelConfig(dim=4096, hidden_dim=11008, n_layers=32, n_heads=32, n_kv_heads=32,
                      vocab_size=32000, max_seq_len=4096)


def two_devices(k=1, memory="1GB"):
    """Root at speed 1, a second device twice as fast; every hop costs 1 ms + 1 ms on the
    wire (the q80 message is 40 + 2 * 34 = 108 bytes at 108 kB/s)."""
    p = Profile.from_dict({
        "devices": [{"name": "a", "memory": memory, "speed": 1.0},
                    {"name": "b", "memory": memory, "speed": 2.0}],
        "default_link": {"latency_ms": 1.0, "bandwidth_mbit_s": 108e3 * 8 / 1e6},
        "layer_ms": 10.0, "classifier_ms": 4.0})
    return CostModel(SMALL, "f32", p, "q80", sequences=k)


# --- the cost model on synthetic numbers --------------------------------------------------------
def test_cost_model_latency_throughput_and_headroom():
    model = two_devices()
    assert model.message_bytes == 108 and model.hop_s[0, 1] == pytest.approx(0.002)
    plan = model.evaluate((0, 1), (2, 4))
    # root: 2 layers x 10 ms + 4 ms of its own; b: 4 layers x 5 ms; two hops of 2 ms
    assert plan.latency == pytest.approx(0.048)
    assert plan.seconds_per_token == pytest.approx(0.048)            # k = 1: latency bound
    for k, per_token in ((2, 0.024), (4, 0.024)):                    # root's 24 ms bound
        assert two_devices(k).evaluate((0, 1), (2, 4)).seconds_per_token == pytest.approx(per_token)
    used = [stage_bytes(SMALL, "f32", 2, True, 16), stage_bytes(SMALL, "f32", 4, False, 16)]
    assert plan.headroom == pytest.approx(1 - max(used) / 1e9)


def test_root_alone_has_no_hops_and_short_memory_is_infeasible():
    model = two_devices()
    assert model.evaluate((0,), (6,)).latency == pytest.approx(0.064)
    tight = two_devices(memory=stage_bytes(SMALL, "f32", 3, True, 16))
    assert not tight.evaluate((0, 1), (4, 2)).feasible
    assert tight.evaluate((0, 1), (3, 3)).feasible


def test_a_device_after_root_without_layers_is_infeasible():
    """The pipeline refuses a rank with no layer, so no plan may have one; root may."""
    model = two_devices()
    assert not model.evaluate((0, 1), (6, 0)).feasible
    assert model.evaluate((0, 1), (0, 6)).feasible


def test_profile_without_timings_is_refused():
    p = Profile.from_dict({"devices": [{"memory": "1GB"}]})
    with pytest.raises(DllmError, match="layer_ms"):
        CostModel(SMALL, "f32", p)


# --- NSGA-II pieces ------------------------------------------------------------------------------
def test_nondominated_sort_and_crowding():
    assert nondominated_sort([[1, 2], [2, 1], [2, 2], [3, 3], [1, 2]]).tolist() == [0, 0, 1, 2, 0]
    d = crowding_distance([[0, 1], [0.5, 0.5], [1, 0], [0.25, 0.8]])
    assert np.isinf(d[0]) and np.isinf(d[2]) and d[1] == pytest.approx(0.75 + 0.8)


def test_crowding_and_nsga2_take_infeasible_points_without_warnings():
    """Infeasible points evaluate to inf; no inf - inf may reach the arithmetic."""
    def half_infeasible(x):
        return (np.inf, np.inf) if x[0] > 0.5 else (x[0], 1 - x[0] + x[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = crowding_distance([[1, np.inf], [2, np.inf], [3, np.inf], [0.5, 2]])
        X, F = nsga2(half_infeasible, 2, pop_size=12, generations=5, seed=0)
    assert np.all(np.isfinite(d) | np.isinf(d)) and len(X) == 12


def test_nsga2_finds_a_known_front():
    """ZDT1 with 4 variables: the front is x[1:] = 0, f2 = 1 - sqrt(f1)."""
    def zdt1(x):
        g = 1 + 9 * x[1:].sum() / 3
        return x[0], g * (1 - np.sqrt(x[0] / g))
    X, F = nsga2(zdt1, 4, pop_size=40, generations=80, seed=3)
    front = F[nondominated_sort(F) == 0]
    assert np.all(front[:, 1] <= 1 - np.sqrt(front[:, 0]) + 0.15)
    assert front[:, 0].min() < 0.05 and front[:, 0].max() > 0.9


# --- baselines and the search ---------------------------------------------------------------------
def brute_force_min_latency(model):
    n, L = model.profile.size, model.config.n_layers
    best = np.inf
    for size in range(1, n + 1):
        for rest in itertools.permutations(range(1, n), size - 1):
            order = (0,) + rest
            for cut in itertools.product(range(L + 1), repeat=size - 1):
                layers = (L - sum(cut),) + cut
                if min(layers) < 0 or 0 in layers[1:]:
                    continue
                best = min(best, model.evaluate(order, layers).latency)
    return best


def random_profile(rng, n):
    return Profile.from_dict({
        "devices": [{"name": f"d{i}", "memory": int(rng.integers(1, 6)) * 10 ** 9 // 4,
                     "speed": float(rng.uniform(0.3, 3))} for i in range(n)],
        "links": [{"between": [f"d{a}", f"d{b}"], "latency_ms": float(rng.uniform(0, 5)),
                   "bandwidth_mbit_s": 100} for a in range(n) for b in range(a + 1, n)],
        "layer_ms": 20.0, "classifier_ms": 5.0})


def test_min_latency_chain_is_the_exact_optimum():
    rng = np.random.default_rng(5)
    config = ModelConfig(**{**LLAMA7B.to_dict(), "n_layers": 6, "max_seq_len": 256})
    for _ in range(4):
        model = CostModel(config, "q40", random_profile(rng, 4), sequences=1)
        plan = min_latency_plan(model)
        assert plan.latency == pytest.approx(brute_force_min_latency(model))


def test_search_front_is_feasible_nondominated_and_holds_the_baselines():
    profile = Profile.from_dict(json.loads(EXAMPLE.read_text()))
    model = CostModel(LLAMA7B, "q40", profile, sequences=4, max_seq_len=2048)
    front, (greedy, fastest) = search(model, pop_size=24, generations=15, seed=1)
    assert front and all(p.feasible for p in front)
    assert not any(p.dominates(q) for p in front for q in front)
    for p in front:
        assert sum(p.layers) == 32 and p.order[0] == 0 and len(set(p.order)) == len(p.order)
        for d, n in zip(p.order, p.layers):
            assert stage_bytes(LLAMA7B, "q40", n, d == 0, 2048, 4) <= profile.devices[d].memory
    # the exact min-latency chain is on the front, the greedy split on it or dominated
    assert min(p.latency for p in front) == pytest.approx(fastest.latency)
    assert any(p.dominates(greedy) for p in front) or \
        any(np.allclose(p.objectives, greedy.objectives) for p in front)
    chosen = recommend(front)
    assert chosen and all(p in front for p in chosen)


def test_greedy_baseline_leaves_out_a_device_too_small_for_a_layer():
    profile = Profile.from_dict({
        "devices": [{"name": "a", "memory": "1GB"}, {"name": "b", "memory": "1GB"},
                    {"name": "tiny", "memory": stage_bytes(SMALL, "f32", 1, False, 16) - 1}],
        "default_link": {"latency_ms": 1.0, "bandwidth_mbit_s": 100},
        "layer_ms": 10.0, "classifier_ms": 4.0})
    plan = greedy_memory_plan(CostModel(SMALL, "f32", profile))
    assert plan.feasible and plan.order == (0, 1) and plan.layers == (3, 3)


LLAMA70B = ModelConfig(dim=8192, hidden_dim=28672, n_layers=80, n_heads=64, n_kv_heads=8,
                       vocab_size=32000, max_seq_len=4096)


def test_a_model_that_fits_no_plan_is_an_error_and_no_baseline_is_on_the_front():
    profile = Profile.from_dict(json.loads(EXAMPLE.read_text()))
    model = CostModel(LLAMA70B, "q40", profile, sequences=4)
    with pytest.raises(DllmError, match="80 layers do not fit the profile's memory"):
        search(model, pop_size=12, generations=2)
    infeasible = greedy_memory_plan(model)
    assert not infeasible.feasible and "on the front" not in baseline_note(infeasible, [])
    feasible = two_devices().evaluate((0, 1), (2, 4))
    assert feasible.dominates(Plan((0, 1), (6, 0)))
    assert "on the front" in baseline_note(feasible, [feasible])


def test_check_table_marks_each_plan_against_the_25_percent_target():
    def row(predicted, measured):
        plan = {"source": "nsga2", "order": ["a", "b"], "layers": [2, 4],
                "predicted": {"ms_per_token": predicted, "tokens_per_s": 10.0}}
        return {"plan": plan, "measured_ms_per_token": measured, "measured_tokens_per_s": 9.0}
    lines = check_table([row(120, 100), row(130, 100), row(80, 100)], 4).splitlines()
    assert "within 25%" in lines[1] and "OUTSIDE 25%" in lines[2] and "within 25%" in lines[3]
    assert lines[-1] == "predicted latency within 25% of measured for 2 of 3 plan(s)"


def test_genome_round_trip():
    profile = Profile.from_dict(json.loads(EXAMPLE.read_text()))
    model = CostModel(LLAMA7B, "q40", profile, sequences=1, max_seq_len=1024)
    for order, layers in (((0, 2, 1), (4, 20, 8)), ((0, 1, 2, 3), (2, 6, 20, 4)), ((0, 2), (8, 24))):
        plan = model.decode(model.encode(model.evaluate(order, layers)))
        assert (plan.order, plan.layers) == (order, layers)


@pytest.mark.skipif(importlib.util.find_spec("pymoo") is None,
                    reason="pymoo not installed (pip install 'dllm[plan]')")
def test_pymoo_engine_agrees_on_the_min_latency_end():
    profile = Profile.from_dict(json.loads(EXAMPLE.read_text()))
    model = CostModel(LLAMA7B, "q40", profile, sequences=4, max_seq_len=2048)
    front, (_, fastest) = search(model, pop_size=24, generations=10, seed=1, engine="pymoo")
    assert front and min(p.latency for p in front) == pytest.approx(fastest.latency)


# --- the command line -----------------------------------------------------------------------------
def run_plan(*args, n=None):
    cmd = (mpirun_command(n) if n else []) + [sys.executable, "-m", "dllm.plan", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)


def test_search_cli_writes_plans(tmp_path):
    out = tmp_path / "plans.json"
    result = run_plan("search", "--profile", EXAMPLE, "--model", demo_model(),
                      "--generations", 5, "--population", 12, "-o", out)
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr
    assert "baselines:" in result.stdout and "min-latency" in result.stdout
    record = json.loads(out.read_text())
    assert record["front"] and record["recommended"]
    plan = record["front"][record["recommended"][0]]
    assert plan["profile"]["layers"] == plan["layers"] and plan["order"][0] == "m1"
    # the plans file is a --profile itself: its recommended plan, or #N of its front
    chosen = as_profile(str(out))
    assert list(chosen.layers) == plan["layers"]
    assert [d.name for d in chosen.devices] == plan["order"]
    last = len(record["front"]) - 1
    assert list(as_profile(f"{out}#{last}").layers) == record["front"][last]["layers"]
    with pytest.raises(DllmError, match="no plan 99"):
        as_profile(f"{out}#99")


@pytest.mark.parametrize("args,fragment", [
    (("search", "--profile", "/nonexistent.json", "--preset", "llama2-7b"), "profile not found"),
    (("search", "--profile", EXAMPLE, "--preset", "llama2-70b"), "80 layers do not fit"),
    (("check", "/nonexistent.json", "--model", "x.h5"), "plans file not found"),
])
def test_cli_errors_are_one_line(args, fragment):
    result = run_plan(*args)
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "Warning" not in result.stderr and "on the front" not in result.stdout
    assert len(lines) == 1 and lines[0].startswith("dllm.plan: error:") and fragment in lines[0]


def test_calibrate_search_check_end_to_end(tmp_path):
    """Two ranks: measure, plan, run the recommended plans (no accuracy asserted here: see
    docs/parallelism.md for the measured comparison)."""
    profile, plans, checks = tmp_path / "p.json", tmp_path / "plans.json", tmp_path / "c.jsonl"
    result = run_plan("calibrate", "--model", demo_model(), "-o", profile, "--repeats", 2,
                      n=2)
    assert result.returncode == 0, result.stderr
    devices = json.loads(profile.read_text())["devices"]
    assert len(devices) == 2 and devices[0]["speed"] == 1.0
    result = run_plan("search", "--profile", profile, "--model", demo_model(),
                      "--sequences", 2, "--generations", 5, "--population", 12, "-o", plans)
    assert result.returncode == 0, result.stderr
    result = run_plan("check", plans, "--model", demo_model(), "--decode-tokens", 2,
                      "--out", checks, n=2)
    assert result.returncode == 0, result.stderr
    rows = json.loads(checks.read_text())["rows"]
    assert rows and all(r["measured_ms_per_token"] > 0 for r in rows)
