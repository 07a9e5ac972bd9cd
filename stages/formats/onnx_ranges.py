"""MinMax calibration ranges for onnxruntime's static quantizer, computed in the runtime without
holding the weights in Python.

onnxruntime's MinMaxCalibrater loads the whole model (weights included) into a ModelProto,
serializes an augmented copy, then keeps every example's outputs until the end: about 2x the
weights plus the outputs before its session even starts (4.7 GB peak for a 400 MB model). Here
the graph is read without its external data, the same ReduceMin/ReduceMax outputs are added to
the same tensors (ORT's select_tensors_to_calibrate rules), the augmented graph is written
beside the prepared one so its external weights resolve in place, and the ranges are kept as a
running nanmin/nanmax. The result is ORT's own TensorsData, saved with ORT's save_tensors_data,
which quantize_static reads as its calibration cache: same ranges, same quantizer.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Iterable

import numpy as np

FLOATS = (1, 10)  # onnx.TensorProto.FLOAT, FLOAT16: the types ORT calibrates


def save_minmax_ranges(prepared: Path, feeds: Iterable[dict[str, np.ndarray]], path: Path) -> int:
    """Write the MinMax ranges of `prepared`'s calibrated tensors over `feeds` to `path` (ORT's
    calibration-cache JSON); returns how many tensors were calibrated. The graph runs as ORT's
    calibrator runs it: unoptimized, so every calibrated tensor is computed as written."""
    import onnx
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData, save_tensors_data

    from .onnx_session import session

    model = onnx.load(str(prepared), load_external_data=False)
    tensors = calibrated_tensors(model)
    _add_reductions(model, tensors)
    augmented = prepared.with_name("augmented_" + prepared.name)  # beside its external data
    onnx.save_model(model, str(augmented))
    del model
    try:
        session_ = session(augmented, level="ORT_DISABLE_ALL")
        names = [i.name for i in session_.get_inputs()]
        wanted = [f"{t}_{op}" for t in tensors for op in ("ReduceMin", "ReduceMax")]
        low: dict[str, np.ndarray] = {}
        high: dict[str, np.ndarray] = {}
        for feed in feeds:
            values = dict(zip(wanted, session_.run(wanted, {n: feed[n] for n in names})))
            for tensor in tensors:
                lo, hi = values[f"{tensor}_ReduceMin"], values[f"{tensor}_ReduceMax"]
                low[tensor] = lo if tensor not in low else np.fmin(low[tensor], lo)  # nanmin, as ORT
                high[tensor] = hi if tensor not in high else np.fmax(high[tensor], hi)
        del session_
    finally:
        augmented.unlink()
    ranges = TensorsData(CalibrationMethod.MinMax, {t: (low[t], high[t]) for t in tensors})
    save_tensors_data(ranges, path)
    return len(tensors)


def unbounded(path: Path) -> list[str]:
    """The calibrated tensors whose range is not finite (attention scores masked with -inf): an
    int8 scale for them is infinite and every value it quantizes garbage, so they stay float."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    return sorted(name for name, data in load_tensors_data(path).items()
                  if not np.isfinite(np.asarray(data.range_value, dtype=np.float64)).all())


def calibrated_tensors(model) -> list[str]:
    """The float, non-initializer inputs and outputs of the nodes whose op types ORT quantizes
    (CalibraterBase.select_tensors_to_calibrate with quantize_static's op types)."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    op_types = set(QLinearOpsRegistry) | set(QDQRegistry)
    infos = {vi.name: vi for vi in itertools.chain(model.graph.value_info, model.graph.output, model.graph.input)}
    initializers = {i.name for i in model.graph.initializer}
    chosen = dict.fromkeys(
        name for node in model.graph.node if node.op_type in op_types
        for name in itertools.chain(node.input, node.output)
        if name in infos and name not in initializers
        and infos[name].type.HasField("tensor_type") and infos[name].type.tensor_type.elem_type in FLOATS)
    return sorted(chosen)


def _add_reductions(model, tensors: list[str]) -> None:
    """ReduceMin/ReduceMax (keepdims, then flattened to shape [1] as ORT's calibrator does, so
    the ranges have its shapes) of each tensor, as graph outputs named <tensor>_ReduceMin/Max."""
    from onnx import helper, numpy_helper

    infos = {vi.name: vi for vi in itertools.chain(model.graph.value_info, model.graph.output, model.graph.input)}
    flat = "calibration_flat_shape"
    model.graph.initializer.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), flat))
    for tensor in tensors:
        for op in ("ReduceMin", "ReduceMax"):
            output = f"{tensor}_{op}"
            model.graph.node.extend([
                helper.make_node(op, [tensor], [output + "_kept"], keepdims=1, name=output),
                helper.make_node("Reshape", [output + "_kept", flat], [output], name=output + "_flat")])
            model.graph.output.append(
                helper.make_tensor_value_info(output, infos[tensor].type.tensor_type.elem_type, [None]))
