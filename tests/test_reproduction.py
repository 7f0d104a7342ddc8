"""dllm.reproduction: the full-depth scaling of reduced-depth bench runs."""
import pytest

from dllm.converters.synthetic import PRESETS
from dllm.reproduction import full_depth, rows, shape_of


def record(preset, layers, ranks, scheme, total, inference, received):
    cfg = PRESETS[preset].to_dict()
    cfg["n_layers"] = layers
    return {"kind": "bench", "model_config": cfg,
            "ms_per_token": {"total": total, "inference": inference, "sync": total - inference},
            "over_ranks": {"bytes_received": {"max": received}},
            "conditions": {"world_size": ranks, "sync_scheme": scheme, "sync": "q80",
                           "link": "1gbit"}}


def test_two_depths_give_the_straight_line_through_them():
    # fixed 10 ms + 5 ms per layer: 4 layers 30, 8 layers 50 -> 32 layers 170
    assert full_depth({4: 30.0, 8: 50.0}, 32) == pytest.approx(170.0)
    assert full_depth({4: 30.0}, 32) == pytest.approx(240.0)   # one depth: in proportion


def test_rows_scale_each_group_and_stand_beside_the_paper():
    runs = [record("llama2-7b", 4, 2, "slices", 30.0, 20.0, 1000.0),
            record("llama2-7b", 8, 2, "slices", 50.0, 36.0, 1800.0),
            record("llama2-7b", 4, 1, "slices", 40.0, 40.0, 0.0),
            record("llama2-7b", 8, 1, "slices", 72.0, 72.0, 0.0)]
    out = {(r["ranks"], r["scheme"]): r for r in rows(runs)}
    two = out[(2, "slices")]
    assert two["total"] == pytest.approx(170.0) and two["inference"] == pytest.approx(132.0)
    assert two["received_kb"] == pytest.approx((200 + 200 * 32) / 1e3)
    assert two["paper"] == (793.69, 739.00, 52.50) and two["full_layers"] == 32
    assert out[(1, "slices")]["total"] == pytest.approx(8 + 8 * 32)
    assert shape_of(PRESETS["llama2-13b"].to_dict()) == "llama2-13b"
    assert shape_of({"dim": 1}) is None
