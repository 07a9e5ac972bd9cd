"""Graphs whose weights live in a data file beside them (as every graph over 64 MB does) go
through every ONNX precision, on a cache that hard-links what entries pass on; shown on the tiny
model with the size thresholds at zero."""
from __future__ import annotations

import pytest

from stages.formats import onnx as onnx_backend

SYNTHETIC = "calibration=synthetic"


@pytest.fixture
def streamed(monkeypatch, in_process):
    monkeypatch.setattr(onnx_backend, "STREAMED", 0)


@pytest.mark.parametrize("artifact_data", [False, True], ids=["inline-artifact", "external-artifact"])
def test_every_precision_builds_from_a_graph_with_external_weights(run_tiny, streamed, artifact_data):
    threshold = ["format.external_data_threshold_mb=0"] if artifact_data else []
    for precision in ("fp32", "fp16", "int8"):  # fp32 first: it hard-links the graph's weights on
        run = run_tiny("format=onnx", f"precision={precision}", SYNTHETIC, *threshold)
        assert run.status == "pass", f"{precision}: {run.error}"
        assert (run.outputs["convert"].dir / "graph.onnx.data").exists()
        # tensors under 1 KB stay inline: the tiny model's int8 weights all do
        assert run.result("lower")["external_data"] is (artifact_data and precision != "int8")
