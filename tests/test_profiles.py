"""Where a cell's time goes: per-operator profiles in the artifact's own runtime."""
from __future__ import annotations

import pytest

from stages.support.profiles import explain, summarize


def test_operator_times_are_summed_per_operator_and_place():
    events = [{"op": "Conv", "where": "XNNPACK", "us": 300.0}, {"op": "gt", "where": "portable kernels", "us": 600.0},
              {"op": "Conv", "where": "XNNPACK", "us": 100.0}] * 2  # two calls
    profile = summarize(events, calls=2)
    assert profile["operators_ms"] == pytest.approx(1.0)
    assert profile["ops"][0] == {"op": "gt", "where": "portable kernels", "ms": 0.6, "share": 0.6, "per_call": 1}
    assert profile["ops"][1]["per_call"] == 2 and profile["where"] == {"portable kernels": 0.6, "XNNPACK": 0.4}
    profile["shape_change"] = {"same_shape_ms": 0.2, "changing_shape_ms": 0.9, "replans": True}
    line = explain(profile, 0.5)
    assert line.startswith("0.50x eager: operator time 1 ms/call (60% portable kernels, 40% XNNPACK)")
    assert "gt (portable kernels) 0.6 ms" in line and "a new batch size costs 0.7 ms" in line


@pytest.mark.parametrize(("fmt", "place"), [("onnx", "CPUExecutionProvider"), ("pte", "XNNPACK")])
def test_a_cell_is_profiled_in_its_runtime(fmt, place, run_tiny):
    run = run_tiny(f"format={fmt}", "benchmark.profile=always", "benchmark.min_seconds=0.1")
    assert run.status == "pass", run.error
    profile = run.result("benchmark")["profile"]
    assert profile["calls"] == 20 and profile["ops"] and place in profile["where"]
    assert {"same_shape_ms", "changing_shape_ms", "replans"} <= set(profile["shape_change"])
    assert profile["why"] in run.result("benchmark")["summary"]
