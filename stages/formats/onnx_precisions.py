"""The precisions ONNX (.onnx) builds, on convert's fp32 graph with ONNX Runtime's own tools:
float16 conversion, static QDQ and dynamic int8 (stages/formats/schemes.py: the registry)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.digests import link_or_copy
from pipelines.memory import release

from ..upstream.onnx import all_tensors, external_bytes, external_tensors, load_graph
from ..upstream.onnxruntime import (float16_without_weights, int8_weight_bits, restore_node_metadata,
                                   unquantizable_average_pools, unquantizable_layer_norms)
from . import Job, calibration_batches
from .onnx import FOLDED, GRAPH, _save, _streamed, load
from .int4 import Int4Options, nothing_quantized
from .onnx_session import session
from .schemes import scheme


@scheme("onnx", "fp32")
def fp32(job: Job) -> str:
    for path in job.source.glob(GRAPH + "*"):  # the graph, and its external data if any
        link_or_copy(path, job.workdir / path.name)
    return "none"


@scheme("onnx", "fp16")
def fp16(job: Job) -> str:
    """ORT's converter on the graph without its external weights (it only retypes them; they
    never pass through memory), then those weights streamed to the new graph's data file."""
    import onnx

    source, target = job.source / GRAPH, job.workdir / GRAPH
    model = onnx.load(str(source), load_external_data=False)
    weights = {}  # name -> the tensor's reference into source's data file
    for tensor in external_tensors(model):
        weights[tensor.name] = onnx.TensorProto()
        weights[tensor.name].CopyFrom(tensor)
        tensor.data_location = onnx.TensorProto.DEFAULT  # weightless: shape inference skips it
        del tensor.external_data[:]
    model = float16_without_weights(model, keep_io_types=True,
                                    node_block_list=_float_nodes(source, job, int8=False) or None)
    if weights:
        _stream_weights(model, source, target, weights)
        onnx.save_model(model, str(target))
    else:
        _save(model, target)
    return "float16 graph, float32 I/O (onnxruntime.transformers.float16)"


def _stream_weights(model, source: Path, target: Path, weights: dict[str, Any]) -> None:
    """The weights `model` was converted without, written one at a time to <target>.data, in
    float16 where the converter retyped a float32 one (as it would have: convert_np_to_float16
    clips into float16's range)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_np_to_float16

    data = target.with_name(target.name + ".data")
    with open(data, "wb") as out:
        for tensor in all_tensors(model):
            if tensor.name not in weights:
                continue
            original = weights[tensor.name]
            raw = external_bytes(source, original)
            if original.data_type == onnx.TensorProto.FLOAT and tensor.data_type == onnx.TensorProto.FLOAT16:
                raw = convert_np_to_float16(np.frombuffer(raw, np.float32)).tobytes()
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data.name), ("offset", out.tell()), ("length", len(raw))):
                tensor.external_data.add(key=key, value=str(value))
            out.write(raw)


@scheme("onnx", "int8", calibrated=True)
def int8(job: Job) -> str:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)

    from .onnx_ranges import save_minmax_ranges, unbounded

    source, target = job.source / GRAPH, job.workdir / GRAPH
    feeds = calibration_batches(job, size=1)  # the same ranges, a batch's worth of memory less
    if any(s["input"] not in feeds[0] for s in job.io["state"]):  # a lifted state: each feed
        # holds the state the fp32 graph returned for the one before, as an app carries it
        from ..support.streaming import carry

        feeds = [feed for feed, _ in carry(load(source, job.io), job.io, feeds)]
    prepared = _pre_processed(source, target.parent)
    method = job.quantize.calibrate_method
    if method == "MinMax":  # ORT's ranges without ORT's calibrator's memory (onnx_ranges.py)
        ranges, reader = target.parent / RANGES, None
        save_minmax_ranges(prepared, feeds, ranges)
        infinite = unbounded(ranges)
        release()
    else:  # histograms: ORT's calibrator, which holds the model and every output (README: Memory)
        class Reader(CalibrationDataReader):
            def __init__(self, batches):
                self.batches = iter(batches)

            def get_next(self):
                return next(self.batches, None)

        ranges, reader, infinite = None, Reader(feeds), []
    bits = int8_weight_bits(job.target.isa)
    unscaled = _nodes_touching(prepared, infinite)
    quantize_static(str(prepared), str(target), reader, calibration_cache_path=ranges,
                    nodes_to_exclude=_float_nodes(prepared, job) + unscaled,
                    quant_format=QuantFormat.QDQ, per_channel=job.quantize.per_channel,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, method), **bits,
                    use_external_data_format=_streamed(prepared),
                    extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
    _float_inputs_for_kept_layers(target, prepared, job)
    _record_folded_activations(target, prepared)
    _remove(prepared)
    return (f"ORT static QDQ int8, {method} calibration"
            + (", per-channel weights" if job.quantize.per_channel else "")
            + (f", {len(unscaled)} nodes float around {len(infinite)} tensors with an infinite range "
               f"(-inf masks)" if unscaled else "")
            + (", 7-bit weights (x86 without VNNI)" if bits["reduce_range"] else ""))


def _nodes_touching(model_path: Path, tensors: list[str]) -> list[str]:
    """The nodes that write or read any of the tensors."""
    import onnx

    if not tensors:
        return []
    wanted = set(tensors)
    model = onnx.load(str(model_path), load_external_data=False)
    return [n.name for n in model.graph.node if wanted & {*n.input, *n.output}]


RANGES = "calibration_ranges.json"  # the activation ranges the quantizer used (ORT's cache format)


def _remove(model_path: Path) -> None:
    """A scratch graph and its external data files."""
    for path in model_path.parent.glob(model_path.name + "*"):
        path.unlink()
    for path in model_path.parent.glob("optimized.onnx*"):
        path.unlink()


def _float_nodes(model_path: Path, job: Job, int8: bool = True) -> list[str]:
    """The nodes left in float: those of the modules quantize.keep_float names and, at int8,
    those that read a state input or write a state output (the state an app carries is never
    quantized), and the LayerNorms and AveragePools onnxruntime's quantizer or its fused kernels
    get wrong (stages/upstream/onnxruntime.py)."""
    import onnx

    from .onnx_graph import in_modules

    model = onnx.load(str(model_path), load_external_data=False)
    ends = {s["input"] for s in job.io["state"]} | {s["output"] for s in job.io["state"]} if int8 else set()
    keep = set(job.quantize.keep_float)
    nodes = [node.name for node in model.graph.node
             if ends & {*node.input, *node.output} or in_modules(node, keep)]
    if int8 and job.quantize.per_channel:
        nodes += unquantizable_layer_norms(model)
    return nodes + (unquantizable_average_pools(model) if int8 else [])


def _float_inputs_for_kept_layers(model_path: Path, original: Path, job: Job) -> None:
    """The layers quantize.keep_float names read float inputs, not their producers' int8."""
    import onnx

    from .onnx_graph import in_modules, unquantized_inputs

    keep = set(job.quantize.keep_float)
    if keep:
        model = load_graph(model_path)
        unquantized_inputs(model, {n.name for n in model.graph.node if in_modules(n, keep)},
                           onnx.load(str(original), load_external_data=False))
        _save(model, model_path)


def _record_folded_activations(model_path: Path, original: Path) -> None:
    import onnx

    from .onnx_graph import folded_activations

    folded = folded_activations(onnx.load(str(model_path), load_external_data=False),
                                onnx.load(str(original), load_external_data=False))
    (model_path.parent / FOLDED).write_text(json.dumps(folded))


@scheme("onnx", "int8_dynamic")
def int8_dynamic(job: Job) -> str:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source, target = job.source / GRAPH, job.workdir / GRAPH
    prepared = _pre_processed(source, target.parent)
    quantize_dynamic(str(prepared), str(target), per_channel=job.quantize.per_channel,
                     nodes_to_exclude=_float_nodes(prepared, job), weight_type=QuantType.QInt8,
                     use_external_data_format=_streamed(prepared), **int8_weight_bits(job.target.isa))
    _remove(prepared)
    return "ORT dynamic int8 weights"


@scheme("onnx", "int4", options=Int4Options)
def int4(job: Job) -> str:
    """onnxruntime's MatMulNBits (block-wise 4-bit weights, fp32 compute) for the MatMuls and
    GatherBlockQuantized for the embedding tables; onnxruntime-web runs both."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from ..upstream.onnxruntime import gemms_as_matmuls
    from .onnx_graph import module_paths

    options: Int4Options = job.options
    source, target = job.source / GRAPH, job.workdir / GRAPH
    kept = set(_float_nodes(source, job, int8=False))
    model = load_graph(source)
    gemms_as_matmuls(model)
    ops = ("MatMul", "Gather") if options.embeddings else ("MatMul",)
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    narrow = [n for n in model.graph.node if n.op_type in ops and n.name not in kept
              and _grouped_width(n, shapes) and not options.fits(_grouped_width(n, shapes))]
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=options.group_size, is_symmetric=True,
                                     nodes_to_exclude=sorted(kept | {n.name for n in narrow}), op_types_to_quantize=ops,
                                     quant_axes=(("MatMul", 0), ("Gather", 1)))
    quantizer.process()
    narrow = [(module_paths(n) or [n.name])[-1] for n in narrow]  # as the user names the layer
    done = Counter(n.op_type for n in quantizer.model.model.graph.node)
    if not done["MatMulNBits"] + done["GatherBlockQuantized"]:
        raise nothing_quantized(options, narrow)
    quantizer.model.save_model_to_file(str(target), use_external_data_format=_streamed(source))
    return (f"ORT MatMulNBits 4-bit weights in groups of {options.group_size} ({done['MatMulNBits']} MatMul"
            + (f", {done['GatherBlockQuantized']} embedding tables" if done["GatherBlockQuantized"] else "")
            + ")" + (f", float where the width is not a multiple of {options.group_size}: {', '.join(narrow)}"
                     if narrow else ""))


def _grouped_width(node, shapes: dict[str, list[int]]) -> int:
    """The width a node's constant weight is grouped along: a MatMul's B is (K, N), grouped along
    K; an embedding table (rows, width), along each row. 0 where the weight is not a constant."""
    dims = shapes.get(node.input[1] if node.op_type == "MatMul" else node.input[0], [])
    return (dims[0] if node.op_type == "MatMul" else dims[1]) if len(dims) == 2 else 0


def _pre_processed(source: Path, workdir: Path) -> Path:
    """What onnxruntime's quant_pre_process does (graph clean-up at ORT_ENABLE_BASIC, then ONNX
    shape inference), file to file: its weights stream to an external data file and are never
    held twice (quant_pre_process loads the whole model first and keeps it: 4x the weights)."""
    import onnx

    optimized, prepared = workdir / "optimized.onnx", workdir / "prepared.onnx"  # never beside
    session(source, level="ORT_ENABLE_BASIC", optimized=optimized, external=True)  # convert's entry
    model = onnx.load(str(optimized), load_external_data=False)
    del model.graph.value_info[:]  # stale shapes left by the exporter trip ORT's re-inference
    restore_node_metadata(onnx.load(str(source), load_external_data=False), model)
    onnx.save_model(model, str(optimized))
    onnx.shape_inference.infer_shapes_path(str(optimized), str(prepared))
    optimized.unlink()
    release()  # the optimizing session's memory, before the quantizer loads the model again
    return prepared
