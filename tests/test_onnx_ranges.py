"""The lean MinMax calibration gives onnxruntime's calibrator's ranges exactly, so the quantized
graph is the one quantize_static makes on its own, for a graph whose weights live in an external
data file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
from onnxruntime.quantization.calibrate import create_calibrator, load_tensors_data
from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
from torch import nn

from stages.formats.onnx_ranges import save_minmax_ranges


def _graph(directory: Path) -> Path:
    """A conv, a matmul and a non-linearity, saved with its weights in an external file."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5), nn.Tanh()).eval()
    program = torch.onnx.export(model, (torch.randn(1, 3, 8, 8),), dynamo=True, input_names=["x"],
                                output_names=["y"], verbose=False)
    path = directory / "prepared.onnx"
    program.save(str(path), external_data=True)
    onnx.shape_inference.infer_shapes_path(str(path), str(path))
    return path


def _feeds(count: int = 6) -> list[dict[str, np.ndarray]]:
    generator = np.random.default_rng(0)
    feeds = [{"x": generator.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(count)]
    feeds[2]["x"][0, 0, 0, 0] = np.nan  # ORT's nanmin/nanmax skip it; so must the running range
    return feeds


class Reader(CalibrationDataReader):
    def __init__(self, feeds):
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)


def test_ranges_equal_onnxruntime_calibrator(tmp_path):
    prepared = _graph(tmp_path)
    ours = tmp_path / "ranges.json"
    count = save_minmax_ranges(prepared, _feeds(), ours)
    op_types = list(set(QLinearOpsRegistry) | set(QDQRegistry))  # what quantize_static passes
    calibrator = create_calibrator(prepared, op_types, augmented_model_path=str(tmp_path / "ort_augmented.onnx"))
    calibrator.collect_data(Reader(_feeds()))
    theirs = calibrator.compute_data()
    mine = load_tensors_data(ours)
    assert count == len(theirs.data) and set(mine.data) == set(theirs.data)
    for name, data in theirs.items():
        assert np.array_equal(mine[name].range_value[0], data.range_value[0]), name
        assert np.array_equal(mine[name].range_value[1], data.range_value[1]), name
        assert mine[name].range_value[0].shape == data.range_value[0].shape
    assert not list(tmp_path.glob("augmented_*")), "the augmented graph is scratch"


def test_quantized_graph_equals_quantize_static(tmp_path):
    prepared = _graph(tmp_path)
    ranges = tmp_path / "ranges.json"
    save_minmax_ranges(prepared, _feeds(), ranges)
    quantize_static(str(prepared), str(tmp_path / "ours.onnx"), None, calibration_cache_path=ranges,
                    quant_format=QuantFormat.QDQ)
    quantize_static(str(prepared), str(tmp_path / "theirs.onnx"), Reader(_feeds()), quant_format=QuantFormat.QDQ)
    ours, theirs = (onnx.load(str(tmp_path / f"{n}.onnx")) for n in ("ours", "theirs"))
    assert ours.graph.SerializeToString() == theirs.graph.SerializeToString()


class Masked(nn.Module):
    """Attention-style scores masked with -inf before a softmax, then a Linear."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 4)

    def forward(self, x):
        scores = (x @ x.transpose(-1, -2)).masked_fill(torch.ones(4, 4, dtype=torch.bool).triu(1), float("-inf"))
        return self.head(torch.softmax(scores, -1) @ x)


def test_a_tensor_masked_with_minus_infinity_is_named_unbounded_and_its_nodes_stay_float(tmp_path):
    """Its calibrated range is infinite: an int8 scale for it is inf and every value garbage."""
    from stages.formats.onnx_precisions import _nodes_touching
    from stages.formats.onnx_ranges import unbounded

    path = tmp_path / "masked.onnx"
    torch.onnx.export(Masked().eval(), (torch.randn(1, 4, 4),), str(path), dynamo=True, input_names=["x"])
    onnx.shape_inference.infer_shapes_path(str(path), str(path))
    ranges = tmp_path / "ranges.json"
    feeds = [{"x": np.random.default_rng(k).normal(size=(1, 4, 4)).astype(np.float32)} for k in range(4)]
    save_minmax_ranges(path, feeds, ranges)
    infinite = unbounded(ranges)
    assert len(infinite) == 1
    model = onnx.load(str(path))
    writer = next(n for n in model.graph.node if infinite[0] in n.output)
    assert writer.op_type == "Where"
    touching = _nodes_touching(path, infinite)
    assert writer.name in touching and any(n.op_type == "Softmax" and n.name in touching for n in model.graph.node)
    from stages.formats.onnx_session import session

    def run(graph: Path) -> np.ndarray:  # as written: no CPU's fused int8 kernels decide the verdict
        return session(graph, as_written=True).run(None, {"x": feeds[0]["x"]})[0].ravel()

    for name, excluded in (("naive", []), ("guarded", touching)):
        quantize_static(str(path), str(tmp_path / f"{name}.onnx"), None, calibration_cache_path=ranges,
                        quant_format=QuantFormat.QDQ, nodes_to_exclude=excluded)
    fp32, naive, guarded = run(path), run(tmp_path / "naive.onnx"), run(tmp_path / "guarded.onnx")
    cosine = lambda a, b: float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))  # noqa: E731
    assert not np.isfinite(naive).all() or cosine(naive, fp32) < 0.9  # what the -inf range does
    assert cosine(guarded, fp32) > 0.99
