"""ONNX (.onnx): the dynamo exporter, then the graph run in onnxruntime (the precisions, applied
on the graph with ONNX Runtime's own tools, are in onnx_precisions.py)."""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipelines.digests import link_or_copy
from pipelines.errors import PipelineError, first_line
from pipelines.memory import release

from ..upstream.onnx import load_graph
from ..upstream.onnxruntime import unsafe_optimizers
from ..upstream.onnxscript import cache_torchlib_ops
from . import Job, weight_summary
from .onnx_session import session

SUFFIX = ".onnx"
KEEPS_STATE = False  # an ONNX graph is a function: state must be inputs and outputs
GRAPH = "graph.onnx"
QUANTIZED_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
                 "ConvInteger", "QLinearConv", "QLinearMatMul", "MatMulNBits", "GatherBlockQuantized")
TWO_GB = 2 * 1024**3
FOUR_BIT = (22, 21)  # onnx.TensorProto.INT4, UINT4: two values a byte


def convert(job: Job) -> dict[str, Any]:
    """The wrapped program as an FP32 ONNX graph: the one every precision starts from."""
    _export(job, job.workdir / GRAPH)
    return {"method": f"torch.onnx dynamo export, opset {job.fmt.opset}"}


def _export(job: Job, path: Path) -> None:
    import torch

    from ..support.export_errors import lowering_failure
    from ..support.model_builder import example_inputs

    program = torch.export.load(job.source / "program.pt2")
    weight_bytes = sum(t.numel() * t.element_size() for t in program.state_dict.values())
    specs = job.io["inputs"]
    # the program carries the specs' dynamic dims; re-tracing its module without them freezes them
    model = program if job.fmt.dynamic_dims else program.module()
    cache_torchlib_ops()
    try:
        onnx_program = torch.onnx.export(
            model, example_inputs(specs, exact=not job.fmt.dynamic_dims), dynamo=True,
            opset_version=job.fmt.opset, input_names=[s["name"] for s in specs],
            output_names=job.io["outputs"], verbose=False)
    except Exception as exc:
        failure = lowering_failure("torch.onnx (dynamo) export", exc, program)
        if failure.module:
            from ..support.repro import failure_repro

            where = failure_repro(job.workdir / "repro", program, specs, failure, "torch.onnx (dynamo) export",
                                  ("torch", "onnx", "onnxscript"), STOCK_EXPORT.format(opset=job.fmt.opset))
            failure.fix += f"; a repro for the exporter's maintainers is in the part's {where}"
        raise failure from exc
    _name_dims(onnx_program.model, specs)
    onnx_program.save(str(path), external_data=weight_bytes > STREAMED)  # streamed, never serialized whole


STREAMED = 64 * 2**20  # graphs above this keep their weights in an external file between stages
FOLDED = "folded.json"  # activations the quantizer folded into QuantizeLinear (for diagnosis)


def _streamed(model_path: Path) -> bool:
    """Whether a graph's weights are big enough to write to an external data file (so they are
    streamed to disk, never serialized through memory a second time)."""
    return _data_bytes(model_path) > STREAMED


STOCK_EXPORT = "torch.onnx.export(program, tuple(inputs), dynamo=True, opset_version={opset})\n"


def _name_dims(model, specs: list[dict[str, Any]]) -> None:
    """Dynamic axes named after the specs' dims (`time`, `batch`), not torch's symbols (`s65`),
    in every shape of the graph, expressions included (`((time - 1)//2) + 1`)."""
    import onnx_ir as ir

    names = {dim.value: name for value, spec in zip(model.graph.inputs, specs)
             for index, name in spec["dynamic"].items()
             for dim in [value.shape[int(index)]] if isinstance(dim, ir.SymbolicDim) and dim.value}
    if not names:
        return
    symbol = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    values = [*model.graph.inputs, *model.graph.outputs, *(v for node in model.graph for v in node.outputs)]
    for value in values:
        if value.shape is not None:
            value.shape = ir.Shape([ir.SymbolicDim(symbol.sub(lambda m: names[m.group()], d.value))
                                    if isinstance(d, ir.SymbolicDim) and d.value else d
                                    for d in value.shape])


APP_STEPS = "app_steps.onnx"  # the processing steps that stay in the app, as their own graph


def attach(job: Job, raw: list[dict[str, Any]], app: list, pre: list, post: list) -> dict[str, Any]:
    """convert/quantize's graph with the processing steps inside (stages/processing/): it takes
    the raw inputs, or what the app's own steps (app_steps.onnx, beside it) make of them."""
    from ..processing import app_model, onnx_model, spec

    inputs = raw
    if app:  # their outputs feed the first step inside, or the model itself (named as its inputs)
        steps = app_model(raw, app, None if pre else [s["name"] for s in job.io["inputs"]], job.fmt.opset)
        _save(steps, job.workdir / APP_STEPS)
        inputs = [spec(value) for value in steps.graph.output]
    model = load_graph(job.source / GRAPH)
    before = _constant_bytes(model)
    if pre or post:
        model = onnx_model(inputs, pre, post, model, job.fmt.opset)
    _save(model, job.workdir / GRAPH)
    return {"inputs": [spec(value) for value in model.graph.input],
            "outputs": [value.name for value in model.graph.output],
            "constant_bytes": _constant_bytes(model) - before}


def _constant_bytes(model) -> int:
    """Bytes of the graph's initializers and Constant values (the weights the audit counts)."""
    from onnx import numpy_helper

    tensors = list(model.graph.initializer) + [
        a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    return sum(numpy_helper.to_array(t).nbytes for t in tensors if t.data_location != 1)


def lower(job: Job) -> dict[str, Any]:
    """The deployable file: ORT basic offline optimisation, metadata, checked with onnx.checker."""
    import onnx

    source = job.source / GRAPH
    has_data = (job.source / (GRAPH + ".data")).exists()
    external = _data_bytes(source) > job.fmt.external_data_threshold_mb * 2**20
    if job.fmt.optimize or external and not has_data:  # an optimized graph keeps untouched
        # external tensors pointing at the source's data file: its weights are written beside it
        optimised = job.workdir / "optimised.onnx"
        session(source, level="ORT_ENABLE_BASIC" if job.fmt.optimize else "ORT_DISABLE_ALL",
                optimized=optimised, external=has_data or external)
        release()
    else:
        optimised = job.workdir / GRAPH
        for path in job.source.glob(GRAPH + "*"):
            link_or_copy(path, job.workdir / path.name)
    artifact = job.workdir / f"model{SUFFIX}"
    # a big one's weights stay on disk; a smaller one's are read in and written inline
    model = onnx.load(str(optimised), load_external_data=False) if external else load_graph(optimised)
    _strip_debug_info(model.graph)
    for key, value in (("precision", job.precision), ("io", json.dumps(job.io))):
        model.metadata_props.add(key=key, value=value)
    data = job.workdir / (optimised.name + ".data")  # absent when every tensor is small
    if external and data.exists():  # the weights file moves beside the artifact under its name
        _relocate(model, data.name, artifact.name + ".data")
        data.rename(job.workdir / (artifact.name + ".data"))
        onnx.save_model(model, str(artifact))  # only the graph is written
    else:
        _save(model, artifact)
    for scratch in job.workdir.glob(optimised.name + "*"):
        scratch.unlink()
    try:
        onnx.checker.check_model(str(artifact), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise PipelineError(f"onnx.checker rejected the model: {first_line(exc)}",
                            fix="see run.log; report the exporter's output as a bug") from exc
    from ..processing import uses_custom_ops

    result = {"artifact": artifact.name, "external_data": artifact.with_name(artifact.name + ".data").exists()}
    if disabled := unsafe_optimizers(model):  # an app's session must do the same
        result["session"] = {"disabled_optimizers": disabled,
                             "why": "onnxruntime 1.31.1 crashes creating a session with them on this graph"}
    if uses_custom_ops(model):
        result.setdefault("session", {})["register"] = "onnxruntime-extensions (get_library_path())"
    return result


def _data_bytes(model_path: Path) -> int:
    """A graph's bytes with its external data files."""
    return sum(p.stat().st_size for p in model_path.parent.glob(model_path.name + "*"))


def _relocate(model, old: str, new: str) -> None:
    """Point the graph's external tensors at a renamed data file."""
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new


def _strip_debug_info(graph) -> None:
    """Drop the exporter's per-node provenance (stack traces, module paths): dead weight in a
    download, and it would ship the build machine's source paths to every user."""
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
        for attribute in node.attribute:
            if attribute.g.node:
                _strip_debug_info(attribute.g)


def _save(model, path: Path) -> None:
    """An in-memory graph (its weights read in) to path, its weights to <path>.data past 2 GB."""
    import onnx

    external = model.ByteSize() > TWO_GB - 2**26
    path.with_name(path.name + ".data").unlink(missing_ok=True)  # stale, and onnx appends to it
    onnx.save_model(model, str(path), save_as_external_data=external,
                    location=path.name + ".data" if external else None)


def runtime(as_written: bool = False) -> str:
    """The runtime load() runs an artifact in, as a report names it."""
    from importlib.metadata import version

    return f"onnxruntime {version('onnxruntime')} CPU" + (", QDQ unfused" if as_written else "")


def load(artifact: Path, io: dict[str, Any], threads: int | None = None, as_written: bool = False
         ) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
    """The artifact in onnxruntime as fn(feed) -> outputs (see session() for the options)."""
    session_ = session(artifact, threads, as_written)
    names = [i.name for i in session_.get_inputs()]

    def run(batch: dict[str, np.ndarray]) -> list[np.ndarray]:
        return session_.run(None, {name: batch[name] for name in names})

    return run


def op_times(artifact: Path, io: dict[str, Any], feed: dict[str, np.ndarray], threads: int, calls: int,
             workdir: Path) -> list[dict[str, Any]]:
    """onnxruntime's profiler over `calls` runs of the artifact: one entry per kernel run (its
    operator type, its execution provider, microseconds)."""
    graph = session(artifact, threads, profile=workdir / "ort_profile")
    names = [i.name for i in graph.get_inputs()]
    for _ in range(calls):
        graph.run(None, {name: feed[name] for name in names})
    trace = Path(graph.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    return [{"op": e["args"].get("op_name", e["name"]), "where": e["args"].get("provider", "?"), "us": e["dur"]}
            for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]


def reference(job: Job) -> tuple[Callable, dict[str, str]]:
    """The quantized graph as written, every node on its own (no graph optimisation, no fused
    int8 kernels), returning its outputs, every module's output, and every module's output as
    the next layer reads it (re-quantized); and module types."""
    from . import onnx_graph

    model = load_graph(job.source / GRAPH)
    points = onnx_graph.module_outputs(model)
    next_reads = {path: onnx_graph.requantized(model, value) for path, value in points.items()}
    types = {path: kind for node in model.graph.node for path, kind in onnx_graph.module_types(node).items()}
    exposed = dict.fromkeys([*points.values(), *next_reads.values()])
    onnx_graph.with_outputs(model, [v for v in exposed if v not in job.io["outputs"]])
    graph = session(model, as_written=True, level="ORT_DISABLE_ALL")
    names = [o.name for o in graph.get_outputs()]

    folded = json.loads((job.source / FOLDED).read_text()) if (job.source / FOLDED).exists() else {}

    def output(path: str, value: np.ndarray, name: str) -> np.ndarray:
        """A module whose own activation the quantizer folded outputs the value clipped by it."""
        fold = folded.get(name)
        return np.clip(value, *fold["range"]) if fold and path in fold["modules"] else value

    def run(feed: dict[str, np.ndarray]):
        values = dict(zip(names, graph.run(None, {i.name: feed[i.name] for i in graph.get_inputs()})))
        return ([values[n] for n in names[:len(job.io["outputs"])]],
                {path: output(path, values[v], v).astype(np.float32) for path, v in points.items()},
                {path: values[v].astype(np.float32) for path, v in next_reads.items()})

    return run, types


def prefix_artifact(job: Job, module: str) -> Path:
    """The graph up to `module`'s output as a file in job.workdir, to run as the artifact is."""
    from . import onnx_graph

    model = load_graph(job.source / GRAPH)
    path = job.workdir / f"prefix{SUFFIX}"
    _save(onnx_graph.prefix(model, onnx_graph.module_outputs(model)[module]), path)
    return path


def inspect(artifact: Path) -> dict[str, Any]:
    """Weights by dtype (initializers and constants) and the quantization ops in the graph."""
    import onnx

    model = onnx.load(str(artifact), load_external_data=False)  # sizes come from dims, not data
    by_dtype: Counter[str] = Counter()
    tensors = list(model.graph.initializer) + [
        a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    packed = {n.input[1]: f"int{next((a.i for a in n.attribute if a.name == 'bits'), 4)}"  # in uint8 bytes
              for n in model.graph.node if n.op_type == "MatMulNBits"}
    for tensor in tensors:
        count = int(np.prod(tensor.dims)) if tensor.dims else 1
        if tensor.data_type in FOUR_BIT:  # GatherBlockQuantized's table
            by_dtype["int4"] += (count + 1) // 2
            continue
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        by_dtype[packed.get(tensor.name, str(dtype))] += count * (dtype.itemsize if dtype.kind != "O" else 1)
    ops = Counter(n.op_type for n in model.graph.node)
    return {**weight_summary(dict(by_dtype), "the .onnx file's initializers and constants"),
            "graph_nodes": sum(ops.values()),
            "quantized_ops": {op: ops[op] for op in QUANTIZED_OPS if ops[op]},
            "quantize_ops": ops["QuantizeLinear"] + ops["DynamicQuantizeLinear"],
            "dequantize_ops": ops["DequantizeLinear"]}
