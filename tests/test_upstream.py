"""The upstream bugs stages/upstream/ works around, each reproduced from a few-layer module.

For each: a test that the pinned library still fails without the workaround (when it starts
passing, the pin fixed it: remove the workaround it names), and a test that the artifact built
with the workaround runs in its runtime and matches PyTorch. No verdict depends on the build
machine's CPU: the x86 int8 case is shown on the artifact's own integers.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from stages.formats import Job
from stages.formats.schemes import chosen
from tests.devices import run_on

DYNAMIC_BATCH = {"0": "batch"}


def spec(name: str, shape: list[int], dtype: str = "float32", dynamic=None, **extra) -> dict:
    return {"name": name, "shape": shape, "dtype": dtype, "dynamic": dynamic or {}, "kwarg": None,
            "low": -1.0, "high": 1.0, "max": 1024, "length_of": None, **extra}


def export(module: nn.Module, specs: list[dict], directory: Path) -> dict:
    """The module as wrap writes it: program.pt2 and its io (one output)."""
    from stages.support.model_builder import PartModule, dynamic_shapes, example_inputs

    part = PartModule(module.eval(), {"name": "p", "inputs": specs})
    program = torch.export.export(part, example_inputs(specs), dynamic_shapes=dynamic_shapes(specs))
    directory.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, directory / "program.pt2")
    return {"inputs": specs, "outputs": ["y"], "state": [], "internal_state": []}


def job(source: Path, io: dict, precision: str, workdir: Path, isa=("x86_64", "arm64"),
        calibration: Path | None = None) -> Job:
    workdir.mkdir(parents=True, exist_ok=True)
    quantize = OmegaConf.create({"per_channel": True, "keep_float": [], "calibrate_method": "MinMax"})
    fmt = OmegaConf.create({"name": "pte", "xnnpack": True, "opset": 18, "dynamic_dims": True,
                            "optimize": True, "external_data_threshold_mb": 1900})
    return Job(source, io, precision, fmt, quantize, calibration, workdir,
               OmegaConf.create({"name": "t", "isa": list(isa)}))


def lowered(module: nn.Module, specs: list[dict], precision: str, tmp: Path, calibration=None) -> Path:
    """quantize + lower of the pte backend, workarounds included; the .pte path."""
    from stages.formats import pte

    io = export(module, specs, tmp / "wrap")
    chosen(precision, "pte").apply(job(tmp / "wrap", io, precision, tmp / "quantize", calibration=calibration))
    pte.lower(job(tmp / "quantize", io, precision, tmp / "lower"))
    return tmp / "lower" / "model.pte"


def run_pte(path: Path, *inputs: torch.Tensor) -> torch.Tensor:
    from executorch.runtime import Runtime

    return Runtime.get().load_program(path).load_method("forward").execute(list(inputs))[0]


def calibration_file(tmp: Path, **arrays: np.ndarray) -> Path:
    path = tmp / "calibration.npz"
    np.savez(path, **arrays)
    return path


# 1. onnxruntime: quantize_static(per_channel=True) on a LayerNorm over two dims ---------------

class NormOverTwoDims(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.norm = nn.LayerNorm([4, 16])  # scale and bias of rank 2

    def forward(self, x):
        return self.norm(self.fc(x))


def _norm_onnx(tmp: Path) -> tuple[Path, dict, np.ndarray]:
    from stages.formats import onnx as onnx_backend

    torch.manual_seed(0)
    specs = [spec("x", [1, 4, 16], dynamic=DYNAMIC_BATCH)]
    io = export(NormOverTwoDims(), specs, tmp / "wrap")
    onnx_backend.convert(job(tmp / "wrap", io, "fp32", tmp / "convert"))
    data = np.random.default_rng(0).standard_normal((32, 1, 4, 16)).astype(np.float32)
    return tmp / "convert", io, data


def test_ort_static_quantizer_still_crashes_on_a_two_dim_layer_norm(tmp_path):
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)

    convert, _, data = _norm_onnx(tmp_path)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"x": data[i]} for i in range(4)])

        def get_next(self):
            return next(self.batches, None)

    with pytest.raises(ValueError, match="truth value of an array"):
        quantize_static(str(convert / "graph.onnx"), str(tmp_path / "q.onnx"), Reader(),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)


def test_a_two_dim_layer_norm_is_left_float_and_the_rest_quantized(tmp_path):
    import onnxruntime as ort

    convert, io, data = _norm_onnx(tmp_path)
    calibration = calibration_file(tmp_path, x=data)
    method = chosen("int8", "onnx").apply(job(convert, io, "int8", tmp_path / "q", calibration=calibration))
    assert "static QDQ" in method
    session = ort.InferenceSession(str(tmp_path / "q" / "graph.onnx"), providers=["CPUExecutionProvider"])
    ops = {node.op_type for node in __import__("onnx").load(str(tmp_path / "q" / "graph.onnx")).graph.node}
    assert "QuantizeLinear" in ops and "LayerNormalization" in ops
    x = data[:8, 0]
    torch.manual_seed(0)
    expected = NormOverTwoDims().eval()(torch.from_numpy(x)).detach().numpy()
    actual = session.run(None, {"x": x})[0]
    cosine = float((expected * actual).sum() / np.linalg.norm(expected) / np.linalg.norm(actual))
    assert cosine > 0.99


# 2. onnxruntime on x86 without VNNI: u8*s8 pairs saturate in int16 ----------------------------

def _int8_mlp(tmp: Path, isa) -> tuple[Path, np.ndarray]:
    from stages.formats import onnx as onnx_backend
    from tests.tiny import TinyNet, calibration

    torch.manual_seed(0)
    specs = [spec("x", [1, 16], dynamic=DYNAMIC_BATCH)]
    io = export(TinyNet(), specs, tmp / "wrap")
    onnx_backend.convert(job(tmp / "wrap", io, "fp32", tmp / "convert"))
    cal = calibration_file(tmp, x=calibration()["x"])
    chosen("int8", "onnx").apply(job(tmp / "convert", io, "int8", tmp / "q", isa=isa, calibration=cal))
    return tmp / "q" / "graph.onnx", calibration()["x"][:, 0]


def _largest_pair(model_path: Path) -> int:
    """The largest |u8 activation x s8 weight| sum of two adjacent products the artifact allows:
    what vpmaddubsw adds into an int16 on x86 CPUs without VNNI."""
    import onnx
    from onnx import numpy_helper

    weights = [numpy_helper.to_array(t) for t in onnx.load(str(model_path)).graph.initializer
               if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    return max(2 * 255 * int(np.abs(w.astype(np.int32)).max()) for w in weights)


def test_full_range_int8_weights_can_overflow_the_x86_pair_sum(tmp_path):
    """What the web and phone targets ship (8-bit weights) would saturate on x86 without VNNI."""
    model, _ = _int8_mlp(tmp_path, isa=["wasm32"])
    assert _largest_pair(model) > np.iinfo(np.int16).max


def test_x86_targets_get_weights_whose_pair_sums_fit_int16(tmp_path):
    """And what x86 targets ship cannot, whatever the CPU: the fused kernels then compute the
    quantized graph's own numbers (compared with onnxruntime's unfused QDQ arithmetic)."""
    import onnxruntime as ort

    model, x = _int8_mlp(tmp_path, isa=["x86_64", "arm64"])
    assert _largest_pair(model) <= np.iinfo(np.int16).max
    reference = ort.SessionOptions()
    reference.add_session_config_entry("session.disable_quant_qdq", "1")
    fused = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    exact = ort.InferenceSession(str(model), reference, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(fused - exact).max() < 1e-3


# 3. executorch: XNNPACKQuantizer makes integer index arithmetic float -------------------------

class PositionTable(nn.Module):
    """Position ids computed as transformers does: integer arithmetic, then indexing."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.table = nn.Parameter(torch.randn(32, 8))

    def forward(self, x):
        positions = (torch.arange(x.shape[1]) + 1) * 2
        return self.fc(x + self.table[positions])


def test_xnnpack_quantizer_still_turns_integer_scalars_into_floats():
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer, get_symmetric_quantization_config)
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    x = torch.randn(2, 5, 8)
    program = torch.export.export(PositionTable().eval(), (x,))
    prepared = prepare_pt2e(program.module(), XNNPACKQuantizer().set_global(
        get_symmetric_quantization_config(is_per_channel=True)))
    with pytest.raises(IndexError, match="tensors used as indices must be long"):
        prepared(x)


def test_integer_scalars_stay_integers_through_pt2e(tmp_path):
    torch.manual_seed(0)
    module = PositionTable().eval()
    x = np.random.default_rng(0).standard_normal((16, 1, 5, 8)).astype(np.float32)
    path = lowered(module, [spec("x", [1, 5, 8])], "int8", tmp_path, calibration_file(tmp_path, x=x))
    sample = torch.from_numpy(x[0])
    actual, expected = run_pte(path, sample), module(sample).detach()
    assert torch.nn.functional.cosine_similarity(actual.flatten(), expected.flatten(), dim=0) > 0.99


# 4. executorch: the optimized fp16 LayerNorm kernel misreads rows of >= 256 elements ----------

class WideNorm(nn.Module):
    def __init__(self, width: int = 256):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x):
        return self.norm(self.fc(x))


def test_executorch_fp16_layer_norm_kernel_is_still_wrong_for_wide_rows(tmp_path):
    from executorch.exir import to_edge_transform_and_lower

    torch.manual_seed(0)
    module = WideNorm().eval().half()
    x = torch.randn(2, 256, dtype=torch.float16)
    edge = to_edge_transform_and_lower(torch.export.export(module, (x,)))
    path = tmp_path / "plain.pte"
    path.write_bytes(edge.to_executorch().buffer)
    assert (run_pte(path, x).float() - module(x).float()).abs().max() > 1.0


def test_fp16_programs_keep_layer_norm_in_fp32(tmp_path):
    torch.manual_seed(0)
    module = WideNorm().eval()
    path = lowered(module, [spec("x", [1, 256], dynamic=DYNAMIC_BATCH)], "fp16", tmp_path)
    x = torch.randn(4, 256)
    assert (run_pte(path, x) - module(x).detach()).abs().max() < 2e-2


# 5. executorch lowering narrows a dynamic batch through the CPU convolution backend choice ----

class SmallConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_executorch_lowering_still_narrows_a_conv_batch_with_cpu_backends_on(tmp_path):
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    batch = torch.export.Dim.DYNAMIC(min=1, max=1024)
    program = torch.export.export(SmallConv().eval(), (torch.randn(2, 1, 8, 8),),
                                  dynamic_shapes=({0: batch},))
    edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    path = tmp_path / "plain.pte"
    path.write_bytes(edge.to_executorch().buffer)
    method = Runtime.get().load_program(path).load_method("forward")
    assert method.metadata.input_tensor_meta(0).sizes()[0] == 15


def test_a_conv_program_keeps_its_dynamic_batch_bound(tmp_path):
    from executorch.runtime import Runtime

    torch.manual_seed(0)
    module = SmallConv().eval()
    path = lowered(module, [spec("x", [1, 1, 8, 8], dynamic=DYNAMIC_BATCH)], "fp32", tmp_path)
    method = Runtime.get().load_program(path).load_method("forward")
    assert method.metadata.input_tensor_meta(0).sizes()[0] == 1024
    stats = json.loads((path.parent / "program_stats.json").read_text())
    assert stats["warnings"] == []
    for rows in (16, 64, 1024):
        x = torch.randn(rows, 1, 8, 8)
        assert (method.execute([x])[0] - module(x).detach()).abs().max() < 1e-4


# 6. onnxruntime: NchwcTransformer segfaults on fp16 graphs with symbolic dims --------------

def _fp16_chain(path: Path) -> Path:
    """Transpose(fp16) -> Cast -> MatMul -> Add -> Cast(fp16) with symbolic dims: what
    convert_float_to_float16 leaves of a GRU's gates."""
    import onnx
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2]),
         helper.make_node("Cast", ["t"], ["t32"], to=T.FLOAT), helper.make_node("MatMul", ["t32", "w"], ["m"]),
         helper.make_node("Add", ["m", "b"], ["y32"]), helper.make_node("Cast", ["y32"], ["y"], to=T.FLOAT16)],
        "chain", [helper.make_tensor_value_info("x", T.FLOAT16, ["a", "b", 64])],
        [helper.make_tensor_value_info("y", T.FLOAT16, None)],
        [numpy_helper.from_array(np.ones((64, 12), np.float32), "w"),
         numpy_helper.from_array(np.ones(12, np.float32), "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8), str(path))
    return path


def test_ort_nchwc_transformer_still_crashes_on_an_fp16_chain_with_symbolic_dims(tmp_path):
    import subprocess
    import sys

    model = _fp16_chain(tmp_path / "chain.onnx")
    code = (f"import onnxruntime as o; o.InferenceSession({str(model)!r}, "
            "providers=['CPUExecutionProvider'])")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == -11  # SIGSEGV


def test_our_sessions_switch_the_crashing_optimizer_off_and_say_so(tmp_path):
    from stages.formats.onnx import session

    model = _fp16_chain(tmp_path / "chain.onnx")
    out = session(model).run(None, {"x": np.ones((20, 4, 64), np.float16)})[0]
    assert out.shape == (4, 20, 12) and float(out[0, 0, 0]) == 65.0


# 7. onnxruntime: QLinearAveragePool with ceil_mode returns 0 -----------------------------------

class WidePool(nn.Module):
    """transformers' EfficientNet pooler: nn.AvgPool2d(kernel, ceil_mode=True) on a small map."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AvgPool2d(32, ceil_mode=True)

    def forward(self, x):
        return self.pool(torch.relu(self.conv(x))).flatten(1)


def _pool_onnx(tmp: Path, precision: str) -> tuple[Path, np.ndarray, np.ndarray]:
    from stages.formats import onnx as onnx_backend

    torch.manual_seed(0)
    module = WidePool().eval()
    io = export(module, [spec("x", [1, 3, 2, 2], dynamic=DYNAMIC_BATCH)], tmp / "wrap")
    onnx_backend.convert(job(tmp / "wrap", io, "fp32", tmp / "convert"))
    data = np.random.default_rng(0).uniform(0, 1, (16, 1, 3, 2, 2)).astype(np.float32)
    chosen(precision, "onnx").apply(job(tmp / "convert", io, precision, tmp / "q",
                                        calibration=calibration_file(tmp, x=data)))
    return tmp / "q" / "graph.onnx", data[:, 0], module(torch.from_numpy(data[:, 0])).detach().numpy()


def test_ort_qlinear_average_pool_still_returns_zeros_with_ceil_mode(tmp_path):
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    model, x, expected = _pool_onnx(tmp_path, "fp32")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"x": x}])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(model), str(tmp_path / "plain.onnx"), Reader(), quant_format=QuantFormat.QDQ)
    assert "AveragePool" in {n.op_type for n in onnx.load(str(tmp_path / "plain.onnx")).graph.node}
    # on x86 without VNNI (natively or emulated, whatever this host is): exact zeros. Not on this
    # host's own kernels: a VNNI CPU leaves one value 0.0028, an ARM one may differ again
    out = run_on("x86-64-avx2", "onnx", tmp_path / "plain.onnx", [{"x": x}])[0][0]
    assert np.abs(out - expected).max() > 0.1 and np.abs(out).max() == 0.0


def test_average_pools_with_ceil_mode_stay_float(tmp_path):
    from stages.formats.onnx import session

    model, x, expected = _pool_onnx(tmp_path, "int8")
    out = session(model).run(None, {"x": x})[0]
    assert np.abs(out - expected).max() < 0.05


# 8. executorch: the edge IR validator pins a GRU's dynamic batch ------------------------------

class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(8, 8, batch_first=True)

    def forward(self, x):
        return self.rnn(x)[0]


def test_executorch_ir_validator_still_pins_a_gru_batch(tmp_path):
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    program = torch.export.export(Recurrent().eval(), (torch.randn(2, 4, 8),),
                                  dynamic_shapes=({0: torch.export.Dim.DYNAMIC(max=1024)},))
    path = tmp_path / "plain.pte"
    path.write_bytes(to_edge_transform_and_lower(program).to_executorch().buffer)
    assert Runtime.get().load_program(path).load_method("forward").metadata.input_tensor_meta(0).sizes()[0] == 2


def test_a_gru_program_keeps_its_dynamic_batch(tmp_path):
    from executorch.runtime import Runtime

    torch.manual_seed(0)
    module = Recurrent().eval()
    path = lowered(module, [spec("x", [1, 4, 8], dynamic=DYNAMIC_BATCH)], "fp32", tmp_path)
    method = Runtime.get().load_program(path).load_method("forward")
    assert method.metadata.input_tensor_meta(0).sizes()[0] == 1024
    x = torch.randn(5, 4, 8)
    assert (method.execute([x])[0] - module(x).detach()).abs().max() < 1e-5


# 9. onnxruntime: an optimized graph written with external initializers loses node metadata ----

def _scoped_onnx(tmp: Path, activation: type[nn.Module] = nn.ReLU) -> Path:
    """A two-layer MLP exported by torch.onnx, its nodes carrying their module paths (a HardSwish
    is an ONNX function, which the optimizer inlines into unnamed nodes)."""
    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act, self.head = nn.Linear(8, 8), activation(), nn.Linear(8, 4)

        def forward(self, x):
            return self.head(self.act(self.fc(x)))

    from stages.support.model_builder import PartModule

    path = tmp / "mlp.onnx"
    part = PartModule(MLP().eval(), {"name": "p", "inputs": [spec("x", [2, 8])]})
    torch.onnx.export(part, (torch.randn(2, 8),), str(path), dynamo=True)
    return path


def _optimized_scopes(source: Path, target: Path, external: bool) -> list[str]:
    import onnx
    import onnxruntime as ort

    from stages.formats.onnx_graph import module_paths

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(target)
    if external:
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         target.name + ".data")
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    return [path for node in onnx.load(str(target), load_external_data=False).graph.node
            for path in module_paths(node)]


def test_ort_still_drops_node_metadata_when_writing_external_initializers(tmp_path):
    source = _scoped_onnx(tmp_path)
    assert {"fc", "head"} <= set(_optimized_scopes(source, tmp_path / "inline.onnx", external=False))
    assert _optimized_scopes(source, tmp_path / "external.onnx", external=True) == []


def test_graphs_prepared_for_quantization_keep_their_module_paths(tmp_path):
    import onnx

    from stages.formats.onnx_precisions import _pre_processed
    from stages.formats.onnx_graph import module_outputs

    prepared = _pre_processed(_scoped_onnx(tmp_path, nn.Hardswish), tmp_path)
    graph = onnx.load(str(prepared), load_external_data=False)
    assert {node.op_type for node in graph.graph.node} >= {"HardSigmoid", "Mul"}  # HardSwish, inlined
    assert list(module_outputs(graph)) == ["fc", "act", "head"]


# 10. onnx: its loader refuses an external data file with more than one hard link --------------

def _external_mlp(tmp: Path) -> tuple[Path, np.ndarray]:
    import onnx
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    weight = np.arange(64, dtype=np.float32).reshape(8, 8)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mlp",
                              [helper.make_tensor_value_info("x", T.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", T.FLOAT, [1, 8])],
                              [numpy_helper.from_array(weight, "w")])
    path = tmp / "graph.onnx"
    onnx.save_model(helper.make_model(graph), str(path), save_as_external_data=True,
                    location="graph.onnx.data", size_threshold=0)
    (tmp / "elsewhere").mkdir()
    os.link(tmp / "graph.onnx.data", tmp / "elsewhere" / "graph.onnx.data")  # as the cache links it
    return path, weight


def test_onnx_still_refuses_a_hard_linked_external_data_file(tmp_path):
    import onnx

    path, _ = _external_mlp(tmp_path)
    with pytest.raises(Exception, match="multiple hard links"):
        onnx.load(str(path))


def test_graphs_with_hard_linked_weights_load(tmp_path):
    from onnx import numpy_helper

    from stages.upstream.onnx import load_graph

    path, weight = _external_mlp(tmp_path)
    model = load_graph(path)
    assert np.array_equal(numpy_helper.to_array(model.graph.initializer[0]), weight)
    assert not model.graph.initializer[0].external_data


def test_external_data_outside_the_models_folder_is_refused(tmp_path):
    import onnx

    from stages.upstream.onnx import load_graph

    path, _ = _external_mlp(tmp_path)
    model = onnx.load(str(path), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../secret.data"
    onnx.save_model(model, str(path))
    with pytest.raises(ValueError, match="outside its folder"):
        load_graph(path)


# onnxruntime's float16 converter decodes every weight to learn its shape


def test_ort_float16_converter_still_decodes_a_weight_to_learn_its_shape():
    from onnx import TensorProto
    from onnxruntime.transformers.float16 import make_value_info_from_tensor

    weightless = TensorProto(name="w", data_type=TensorProto.FLOAT16, dims=[8, 8])
    with pytest.raises(ValueError, match="cannot reshape array of size 0"):
        make_value_info_from_tensor(weightless)


def test_float16_graphs_stream_their_weights_and_match_the_converter(tmp_path, monkeypatch):
    """A graph whose weights are in a data file becomes float16 without loading them: the same
    bytes as ORT's converter on the loaded graph (clipping included), and the same outputs."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from stages.formats import onnx as onnx_backend
    from stages.upstream.onnx import load_graph

    monkeypatch.setattr(onnx_backend, "STREAMED", 0)  # tiny weights go to a data file too
    module = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 4))
    with torch.no_grad():
        module[0].weight[0, :3] = torch.tensor([1e5, -1e-9, 3e-8])  # past float16's range
    specs = [spec("x", [2, 16])]
    io = export(module, specs, tmp_path / "wrap")
    onnx_backend.convert(job(tmp_path / "wrap", io, "fp32", tmp_path / "convert"))
    source = tmp_path / "convert" / "graph.onnx"
    assert onnx_backend._streamed(source)
    chosen("fp16", "onnx").apply(job(tmp_path / "convert", io, "fp16", tmp_path / "quantize"))
    streamed = tmp_path / "quantize" / "graph.onnx"
    assert onnx.load(str(streamed), load_external_data=False).graph.initializer[0].external_data

    expected = convert_float_to_float16(load_graph(source), keep_io_types=True)
    got = {t.name: numpy_helper.to_array(t) for t in load_graph(streamed).graph.initializer}
    for tensor in expected.graph.initializer:
        np.testing.assert_array_equal(got[tensor.name], numpy_helper.to_array(tensor), err_msg=tensor.name)
    x = np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32)
    run = onnx_backend.load(streamed, io)
    np.testing.assert_allclose(run({"x": x})[0], module(torch.from_numpy(x)).detach().numpy(), atol=2e-2)


# ExecuTorch's bundled-program serializer grows a 1 KiB buffer and copies its output twice


def test_bundles_are_written_byte_for_byte_as_executorch_writes_them_in_half_the_memory(tmp_path):
    import tracemalloc

    from executorch.devtools.bundled_program.config import MethodTestCase, MethodTestSuite
    from executorch.devtools.bundled_program.core import BundledProgram
    from executorch.devtools.bundled_program.serialize import serialize_from_bundled_program_to_flatbuffer

    from stages.upstream.executorch import write_bundle

    module = nn.Sequential(nn.Linear(512, 2048), nn.ReLU(), nn.Linear(2048, 512))  # 8 MB of weights
    pte = lowered(module, [spec("x", [1, 512])], "fp32", tmp_path)
    x = torch.randn(1, 512)
    suite = MethodTestSuite("forward", [MethodTestCase([x], [module(x).detach()])])

    def peak(write) -> int:
        tracemalloc.start()
        write(BundledProgram(None, [suite], pte_file_path=str(pte)))
        used = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return used

    theirs = tmp_path / "theirs.bpte"
    their_peak = peak(lambda bundle: theirs.write_bytes(serialize_from_bundled_program_to_flatbuffer(bundle)))
    our_peak = peak(lambda bundle: write_bundle(bundle, tmp_path / "ours.bpte"))
    assert (tmp_path / "ours.bpte").read_bytes() == theirs.read_bytes()
    size = pte.stat().st_size
    assert our_peak < 2.2 * size < 4 * size < their_peak, (our_peak / size, their_peak / size)


# 11. executorch: XNNPACK takes a PReLU after a Linear, then its channels-last pass fails on it -

class FaceHead(nn.Module):
    """An MTCNN face detector's tail in a few layers: conv, PReLU, ceil-mode max pool, the
    (0, 3, 2, 1) permute before the flatten, Linear, PReLU on the (N, 16) features, Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.prelu1 = nn.PReLU(8)
        self.pool = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.dense = nn.Linear(8 * 5 * 5, 16)
        self.prelu2 = nn.PReLU(16)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        x = self.pool(self.prelu1(self.conv(x))).permute(0, 3, 2, 1).contiguous()
        return self.head(self.prelu2(self.dense(x.flatten(1))))


FACES = [spec("x", [1, 3, 12, 12], dynamic=DYNAMIC_BATCH)]


def test_xnnpack_still_fails_on_a_prelu_after_a_linear():
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    program = torch.export.export(FaceHead().eval(), (torch.randn(1, 3, 12, 12),))
    with pytest.raises(Exception, match="ChannelsLastTaggedReshapePass") as info:
        to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    assert "non-NHWC compatible node to NHWC" in str(info.value.__cause__)


def test_a_prelu_after_a_linear_is_lowered_and_matches(tmp_path):
    torch.manual_seed(0)
    module = FaceHead().eval()
    path = lowered(module, FACES, "fp32", tmp_path)
    stats = json.loads((path.parent / "program_stats.json").read_text())
    assert stats["left_out_of_delegate"] == [] and stats["warnings"] == []
    # the PReLUs on XNNPACK's kernel, 4-D views around one (a dynamic batch keeps the ceil-mode
    # pool and the flatten's view on the portable kernels: XNNPACK's own rules)
    assert not {"prelu", "gt", "where"} & set(stats["non_delegated_ops"]), stats["non_delegated_ops"]
    x = torch.randn(5, 3, 12, 12)
    assert (run_pte(path, x) - module(x).detach()).abs().max() < 1e-5


def test_a_module_the_delegate_fails_on_is_left_out_and_leaves_a_repro(tmp_path, monkeypatch):
    """Any lowering failure on a module's node: that module runs on the portable kernels, said;
    repro/<module> holds the smallest failing module alone, its inputs and the stock lowering
    call, and its script reproduces the failure in a fresh process."""
    import subprocess
    import sys

    from torch.fx.passes.infra.pass_base import PassResult

    from stages.formats import pte

    monkeypatch.setattr(pte, "prelu_in_four_dims", lambda graph: PassResult(graph, False))  # workaround off
    torch.manual_seed(0)
    module = FaceHead().eval()
    path = lowered(module, FACES, "fp32", tmp_path)
    stats = json.loads((path.parent / "program_stats.json").read_text())
    assert [failed["module"] for failed in stats["left_out_of_delegate"]] == ["prelu2"]
    assert "module prelu2 left out of the XNNPACK delegate" in stats["warnings"][0]
    assert "non-NHWC compatible node to NHWC" in stats["warnings"][0]
    assert "where" in stats["non_delegated_ops"]  # the PReLU, decomposed for the portable kernels
    x = torch.randn(1, 3, 12, 12)
    assert (run_pte(path, x) - module(x).detach()).abs().max() < 1e-5
    assert stats["left_out_of_delegate"][0]["repro"] == "repro/prelu2 (prelu2, 1 operators)"
    folder = path.parent / "repro" / "prelu2"
    assert "ChannelsLastTaggedReshapePass" in (folder / "README.md").read_text()
    assert [tuple(t.shape) for t in torch.load(folder / "inputs.pt")] == [(2, 16)]  # the traced example
    done = subprocess.run([sys.executable, "repro.py"], cwd=folder, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "reproduced: AssertionError: Attempting to convert non-NHWC compatible node to NHWC" in done.stderr


# ------------------------------------------------ int4: MatMulNBits and torchao's 4-bit tensors


def _gemm_graph(path: Path) -> Path:
    torch.onnx.export(nn.Sequential(nn.Linear(32, 8)).eval(), (torch.randn(2, 32),), str(path), dynamo=True)
    return path


def test_ort_nbits_quantizer_still_passes_over_a_gemm(tmp_path):
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(_gemm_graph(tmp_path / "gemm.onnx")))
    assert [n.op_type for n in model.graph.node] == ["Gemm"]
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=32, is_symmetric=True)
    quantizer.process()
    assert [n.op_type for n in quantizer.model.model.graph.node] == ["Gemm"]  # still float


def test_a_gemm_rewritten_as_matmul_is_quantized_to_four_bits_and_matches(tmp_path):
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from stages.upstream.onnxruntime import gemms_as_matmuls

    path = _gemm_graph(tmp_path / "gemm.onnx")
    model = onnx.load(str(path))
    assert gemms_as_matmuls(model) == 1
    rewritten = tmp_path / "matmul.onnx"
    onnx.save(model, str(rewritten))
    name = ort.InferenceSession(str(path)).get_inputs()[0].name
    x = {name: np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32)}
    before = ort.InferenceSession(str(path)).run(None, x)[0]
    assert np.allclose(ort.InferenceSession(str(rewritten)).run(None, x)[0], before, atol=1e-6)
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=32, is_symmetric=True)
    quantizer.process()
    assert "MatMulNBits" in [n.op_type for n in quantizer.model.model.graph.node]
    quantizer.model.save_model_to_file(str(tmp_path / "int4.onnx"))
    after = ort.InferenceSession(str(tmp_path / "int4.onnx")).run(None, x)[0]
    assert np.corrcoef(after.ravel(), before.ravel())[0, 1] > 0.99


def _four_bit_linear_graph():
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    graph = torch.export.export(nn.Sequential(nn.Linear(32, 8)).eval(), (torch.randn(2, 32),)).module()
    stand_in = nn.Linear(32, 8)
    quantize_(stand_in, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                              weight_granularity=PerGroup(32)))
    graph.get_submodule("0").weight = stand_in.weight
    return graph


def test_torchao_four_bit_tensor_still_fails_under_aten_linear():
    with pytest.raises(NotImplementedError, match="aten.t"):
        _four_bit_linear_graph()(torch.randn(2, 32))


def test_four_bit_weights_on_an_exported_graph_are_quantized_and_match():
    from stages.formats.int4 import Int4Options
    from stages.formats.torchao_weights import int4_weights

    model = nn.Sequential(nn.Linear(32, 8)).eval()
    graph = torch.export.export(model, (torch.randn(2, 32),)).module()
    done = int4_weights(graph, Int4Options(group_size=32), [])
    x = torch.randn(2, 32)
    assert len(done.linear) == 1
    assert torch.nn.functional.cosine_similarity(graph(x).flatten(), model(x).flatten(), dim=0) > 0.99


def _fresh_python(code: str):
    import subprocess
    import sys

    from tests.test_corpus import ensure_corpus_deps

    ensure_corpus_deps()  # torchvision and transformers, as pinned in requirements-corpus.txt
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])


def test_pinned_torchvision_does_not_import_beside_the_cpu_torch():
    result = _fresh_python("import torchvision")
    assert result.returncode != 0 and "operator torchvision::nms does not exist" in result.stderr


def test_with_the_workaround_torchvision_and_every_transformers_model_import():
    result = _fresh_python(
        "import sys\n"
        "from stages.upstream.torchvision import importable\n"
        "importable(); importable()\n"
        "assert 'torchvision' not in sys.modules  # nothing paid until something imports it\n"
        "import importlib.util; importlib.util.find_spec('torchvision')  # transformers' availability check\n"
        "import torchvision.models.detection, torch\n"
        "from transformers import BertConfig, BertModel\n"
        "net = torchvision.models.resnet18(weights=None).eval()\n"
        "print(net(torch.zeros(1, 3, 32, 32)).shape[-1], type(BertModel(BertConfig(num_hidden_layers=1,"
        " hidden_size=32, num_attention_heads=2, intermediate_size=64))).__name__)")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["1000", "BertModel"]


LLAMA = {"vocab_size": 64, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


def _llama():
    from stages.upstream.torchvision import importable
    from tests.test_corpus import ensure_corpus_deps

    ensure_corpus_deps()
    importable()
    import transformers

    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()


def test_transformers_static_cache_wrapper_still_leaves_its_cache_as_constants():
    """transformers 5.23's TorchExportableModuleWithStaticCache: the cache is lifted as constants,
    and decomposing the program (what every backend does) fails."""
    model = _llama()  # first: it makes transformers importable
    from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

    model.generation_config.use_cache, model.generation_config.cache_implementation = True, "static"
    wrapper = TorchExportableModuleWithStaticCache(model, batch_size=1, max_cache_len=32)
    program = torch.export.export(wrapper, (), {"input_ids": torch.tensor([[3]]), "cache_position": torch.tensor([0])})
    assert not program.graph_signature.buffers_to_mutate
    assert sum(spec.kind.name == "CONSTANT_TENSOR" for spec in program.graph_signature.input_specs) >= 4
    with pytest.raises(AssertionError, match="expected compiled_fn to be GraphModule"):
        program.run_decompositions({})


def test_a_causal_lm_step_writes_its_cache_as_the_programs_buffers():
    """stages/upstream/transformers.py: the program's only state is its keys and values, written at
    the position input; decoding token by token gives the logits of the whole sequence at once."""
    from stages.support.state_io import mutated_buffers
    from stages.upstream.transformers import CausalLMStep

    step = CausalLMStep("transformers.LlamaForCausalLM", "transformers.LlamaConfig", LLAMA, max_length=32).eval()
    step.net.load_state_dict(_llama().state_dict())
    program = torch.export.export(step, (torch.tensor([[3]]), torch.tensor([0])))
    assert mutated_buffers(program) == ["key_cache_0", "key_cache_1", "value_cache_0", "value_cache_1"]
    assert not [key for key in step.state_dict() if "cache" in key]  # state, not weights
    tokens = [3, 9, 1, 4, 5, 6, 7, 8]
    decoded = program.module()
    with torch.no_grad():
        whole = step.net(input_ids=torch.tensor([tokens])).logits[0]
        for position, token in enumerate(tokens):
            logits = decoded(torch.tensor([[token]]), torch.tensor([position]))
            assert torch.allclose(logits[0], whole[position], atol=1e-5), position


def _reloaded(program):
    import io

    import torch

    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    return torch.export.load(buffer)


def _converted_script():
    """A scripted module, saved and loaded as a user's file is (torch.jit.load), converted."""
    import io

    import torch
    from torch._export.converter import TS2EPConverter

    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU())), buffer)
    buffer.seek(0)
    return TS2EPConverter(torch.jit.load(buffer), (torch.rand(2, 6),)).convert()


def test_torchscript_converter_still_saves_weights_that_reload_without_deepcopy():
    """torch 2.13: TS2EPConverter lifts the parameters as buffers that require grad; reloaded,
    they are non-leaf views that copy.deepcopy (ExecuTorch's lowering) refuses."""
    import copy

    from torch.export.graph_signature import InputKind

    program = _converted_script()
    assert {spec.kind for spec in program.graph_signature.input_specs if spec.target} == {InputKind.BUFFER}
    with pytest.raises(RuntimeError, match="graph leaves"):
        copy.deepcopy(_reloaded(program).module())


def test_converted_programs_reload_with_parameters_that_deep_copy(tmp_path):
    """(that INT8 then quantizes them as weights: tests/test_graph_files.py's six cells)"""
    import copy

    import torch
    from torch.export.graph_signature import InputKind

    from stages.support.checkpoint_formats import load_checkpoint_file
    from stages.upstream.torch_export import without_grad

    program = _converted_script()
    x = torch.rand(2, 6)
    expected = program.module()(x)
    fixed = _reloaded(without_grad(program))
    assert {spec.kind for spec in fixed.graph_signature.input_specs if spec.target} == {InputKind.PARAMETER}
    torch.testing.assert_close(copy.deepcopy(fixed.module())(x), expected)
    torch.export.save(_converted_script(), tmp_path / "user.pt2")  # a user's own save of the converter's program
    copy.deepcopy(load_checkpoint_file(tmp_path / "user.pt2").program.module())


def _lower_linear(path, folder=None):
    """A 2-layer MLP (a 2 MiB weight) lowered to XNNPACK and written to `path`; with `folder`,
    through file_backed_constants. Returns the types of the blobs the delegate's store held."""
    import contextlib

    import torch
    from executorch.exir import to_edge_transform_and_lower
    from executorch.exir._serialize._named_data_store import NamedDataStore

    from stages.upstream.executorch import file_backed_constants, xnnpack_partitioner

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 8)).eval()
    program = torch.export.export(model, (torch.rand(1, 512),))
    held = []
    merge = NamedDataStore.merge_named_data_store

    def spy(self, other):
        held.extend(type(b).__name__ for b in other.buffers)
        return merge(self, other)

    NamedDataStore.merge_named_data_store = spy
    try:
        with file_backed_constants(folder) if folder else contextlib.nullcontext():
            lowered = to_edge_transform_and_lower(program, partitioner=[xnnpack_partitioner()]).to_executorch()
            with open(path, "wb") as out:
                lowered.write_to_file(out)
    finally:
        NamedDataStore.merge_named_data_store = merge
    return held


def test_xnnpack_still_holds_a_copy_of_every_weight_in_memory_while_lowering(tmp_path):
    """executorch 1.5.1: node_visitor.py:646 hands its NamedDataStore `bytes(array)`."""
    held = _lower_linear(tmp_path / "plain.pte")
    assert "bytes" in held and "FileBackedData" not in held


def test_lowered_weights_wait_in_files_and_the_pte_is_byte_for_byte_the_same(tmp_path):
    held = _lower_linear(tmp_path / "filed.pte", tmp_path / "constants")
    assert held.count("FileBackedData") == 1 and "bytes" in held  # the 2 MiB weight; the small ones stay bytes
    assert not (tmp_path / "constants").exists()  # the files go once the .pte is written
    _lower_linear(tmp_path / "plain.pte")
    assert (tmp_path / "filed.pte").read_bytes() == (tmp_path / "plain.pte").read_bytes()


def test_onnxscript_still_reparses_each_torchlib_function_on_every_registry_build():
    """onnxscript 0.7.2's `TracedOnnxFunction.function_ir` (torchlib's functions) is a plain property that parses the function's source
    each time, so torch's per-export registry re-parses ~500 of them (stages/upstream/onnxscript.py)."""
    from onnxscript._internal.values import TracedOnnxFunction

    assert isinstance(TracedOnnxFunction.__dict__["function_ir"], property)


def test_torchlibs_operator_list_is_built_once_a_process_and_exports_still_work(tmp_path):
    from onnxscript._framework_apis import torch_2_11

    from stages.upstream.onnxscript import cache_torchlib_ops

    cache_torchlib_ops()
    cache_torchlib_ops()  # installs once
    assert torch_2_11.get_torchlib_ops() is torch_2_11.get_torchlib_ops()
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU()).eval()
    program = torch.onnx.export(model, (torch.randn(2, 4),), dynamo=True, verbose=False)
    program.save(str(tmp_path / "m.onnx"))
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {program.model.graph.inputs[0].name: x})[0]
    np.testing.assert_allclose(got, model(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_every_xnnpack_pattern_graph_has_the_operator_its_guard_looks_for():
    """stages/upstream/executorch.py pattern_graphs_when_matchable skips XNNPACK's SDPA and
    bilinear patterns for a graph without aten._softmax / aten.upsample_bilinear2d.vec: sound
    only while every pattern has that node (the matcher pairs nodes of equal targets)."""
    from executorch.backends.xnnpack.partition.graphs import bilinear_2d, sdpa
    from executorch.exir.dialects._ops import ops as exir_ops

    def targets(pattern):
        return {node.target for node in pattern.graph.nodes if node.op == "call_function"}

    assert sdpa.get_graphs() and all(exir_ops.edge.aten._softmax.default in targets(p) for p in sdpa.get_graphs())
    patterns = bilinear_2d.get_graphs_dict()
    assert patterns and all(exir_ops.edge.aten.upsample_bilinear2d.vec in targets(p) for p in patterns)


LOWER_IN_A_FRESH_PROCESS = """
import sys, torch
from torch import nn
from executorch.backends.xnnpack.partition.graphs import bilinear_2d, sdpa
from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
from executorch.exir import to_edge_transform_and_lower
from stages.upstream.executorch import pattern_graphs_when_matchable

class Model(nn.Module):
    def __init__(self, upsample):
        super().__init__()
        self.conv, self.upsample = nn.Conv2d(1, 2, 3, padding=1), upsample
    def forward(self, x):
        y = torch.relu(self.conv(x))
        return nn.functional.interpolate(y, scale_factor=2, mode="bilinear") if self.upsample else y

model = Model(sys.argv[1] == "upsample").eval()
x = torch.randn(1, 1, 8, 8)
with pattern_graphs_when_matchable():
    edge = to_edge_transform_and_lower(torch.export.export(model, (x,)), partitioner=[XnnpackPartitioner()])
built = [bilinear_2d._get_bilinear_2d_graphs.cache_info().currsize, sdpa.get_graphs.cache_info().currsize]
ops = [str(n.target) for n in edge.exported_program().graph.nodes if n.op == "call_function"]
print(built, "upsample" in " ".join(ops), sum("delegate" in o for o in ops))
"""


@pytest.mark.parametrize("model, built", [("conv", [0, 0]), ("upsample", [1, 0])])
def test_a_lowering_builds_the_pattern_graphs_only_for_a_graph_that_can_match_them(model, built):
    """A conv model never pays the graphs (2-4 s); one with a bilinear upsample builds and
    matches the bilinear ones, and its upsample is delegated as before."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = subprocess.run([sys.executable, "-c", LOWER_IN_A_FRESH_PROCESS, model], cwd=ROOT, capture_output=True,
                         text=True, check=True, timeout=300).stdout.split("\n")[-2]
    assert out.startswith(str(built))
    assert " False " in out  # no upsample left outside the delegate


def test_every_conv_bn_pattern_of_the_quantizer_has_the_operators_its_guard_looks_for(monkeypatch):
    """stages/upstream/executorch.py conv_bn_patterns_when_matchable skips XNNPACKQuantizer's
    conv-bn annotators for a graph without an aten.batch_norm and one of their convolutions:
    sound only while every pattern they trace has both (the matcher pairs nodes of equal targets)."""
    from executorch.backends.xnnpack.quantizer import xnnpack_quantizer_utils as utils
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config

    from stages.upstream.executorch import CONV_BN_PATTERN_NEEDS

    traced = []

    def recorded(*args, **kwargs):
        traced.append(pattern := original(*args, **kwargs))
        return pattern

    original = utils._get_aten_graph_module_for_pattern
    monkeypatch.setattr(utils, "_get_aten_graph_module_for_pattern", recorded)
    graph = torch.export.export(nn.Linear(2, 2), (torch.randn(1, 2),)).module()
    for name, convolutions in CONV_BN_PATTERN_NEEDS.items():
        traced.clear()
        utils.OP_TO_ANNOTATOR[name](graph, get_symmetric_quantization_config(), None)
        assert traced, name
        for pattern in traced:
            targets = {node.target for node in pattern.graph.nodes if node.op == "call_function"}
            assert torch.ops.aten.batch_norm.default in targets and targets & set(convolutions), (name, targets)


class NormThenConv(nn.Module):
    """A batch norm prepare_pt2e cannot fold into a conv (one after a conv it folds first)."""

    def __init__(self, norm: bool):
        super().__init__()
        self.norm, self.conv = nn.BatchNorm2d(1) if norm else nn.Identity(), nn.Conv2d(1, 4, 3)

    def forward(self, x):
        return torch.relu(self.conv(self.norm(x)))


@pytest.mark.parametrize("norm, traces", [(False, 0), (True, 6)])
def test_pt2e_traces_the_conv_bn_patterns_only_for_a_graph_that_can_match_them(monkeypatch, norm, traces):
    """A conv model without batch norm never pays the twelve traces (1.5-2 s a process); one with
    a conv2d and a batch norm left traces the conv ones (not the transposed) and is annotated
    exactly as without the guard."""
    from executorch.backends.xnnpack.quantizer import xnnpack_quantizer_utils as utils
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer, get_symmetric_quantization_config)
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    from stages.upstream.executorch import conv_bn_patterns_when_matchable

    count = [0]

    def counted(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    original = utils._get_aten_graph_module_for_pattern
    monkeypatch.setattr(utils, "_get_aten_graph_module_for_pattern", counted)
    torch.manual_seed(0)
    program = torch.export.export(NormThenConv(norm).eval(), (torch.randn(1, 1, 8, 8),))

    def prepared_code():
        quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
        return prepare_pt2e(program.module(), quantizer).code

    with conv_bn_patterns_when_matchable():
        guarded = prepared_code()
    assert count[0] == traces
    assert guarded == prepared_code()


def test_executorch_parses_its_edge_dialect_yaml_with_ruamels_c_parser():
    """executorch.exir loads edge.yaml (138 KB) at import with YAML(typ="safe"): 0.68 s in pure
    Python, 0.12 s with ruamel.yaml.clib, which requirements.txt pins for it."""
    from ruamel.yaml import YAML

    assert YAML(typ="safe").Parser.__name__ == "CParser"
