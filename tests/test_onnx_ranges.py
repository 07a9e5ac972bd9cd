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
