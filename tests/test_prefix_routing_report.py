"""The routing benchmark's report: where TTFT went, and a repeated load judged by the median
over its traces (one lucky trace must not pass the 3x goal)."""

import json

import pytest

from benchmarks.prefix_routing import TTFT_PARTS, ttft_parts, write_levels


def test_ttft_parts_split_the_clients_ttft_into_the_routers_parts() -> None:
    timing = {"ttft_ms": 50.0, "router_ms": 1.0, "prefill_network_ms": 4.0,
              "prefill_queue_ms": 10.0, "prefill_first_token_ms": 30.0,
              "prefill_emit_ms": 2.0}
    log = [{"ttft": 0.056, "timing": timing},
           {"ttft": None, "timing": timing},  # no first token: not counted
           {"ttft": 0.040, "timing": {"ttft_ms": 39.0}}]  # a worker without the parts
    parts = ttft_parts(log)
    assert set(parts) == {*TTFT_PARTS, "router_other", "client"}
    assert parts["router_other"]["p50"] == pytest.approx(3.0)
    assert parts["client"]["p50"] == pytest.approx(6.0)
    assert parts["worker_first_token"]["mean"] == 30.0


def level(load: float, rr_over_kv: float) -> dict:
    return {"load": load, "oracle_hit_ratio": 0.9, "policies": {
        "kv": {"ttft_p50_ms": 10.0, "ttft_p99_ms": 20.0, "hit_ratio": 0.88},
        "round-robin": {"ttft_p50_ms": 10.0 * rr_over_kv, "ttft_p99_ms": 40.0,
                        "hit_ratio": 0.7}}}


def test_a_repeated_load_passes_only_on_its_median(tmp_path, capsys) -> None:
    class Args:
        out = str(tmp_path / "r.json")
        preset, device, serve_args, workers = "small-llama", "cpu", "", 2
        systems, system_len, sessions, turns, msg_len, out_len = 8, 64, 4, 2, 16, 4
        first_msg_len = 0
        rate, think, seed = 1.0, 1.0, 0
    write_levels(Args, [level(3.0, 4.5), level(3.0, 2.0), level(3.0, 2.5), level(4.0, 3.1)],
                 kv_blocks=10, working_set=100, capacity=50, loadavg_start=[0.0, 0.0, 0.0])
    out = json.loads((tmp_path / "r.json").read_text())
    assert out["ttft_p50_round_robin_over_kv_by_load"]["3.0"] == pytest.approx(
        {"traces": 3, "median": 2.5, "min": 2.0, "max": 4.5})
    assert out["loads_with_3x_lower_ttft_p50"] == [4.0]
