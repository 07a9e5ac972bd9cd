"""ExecuTorch (.pte): PT2E + XNNPACKQuantizer on the ExportedProgram, XNNPACK lowering,
and the executorch.runtime to run it."""
from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pipelines.digests import link_or_copy
from pipelines.errors import PipelineError
from pipelines.memory import release

from ..support.export_errors import lowering_failure, traceback_frames
from ..support.model_builder import used_tensors
from ..support.state_io import mutated_buffers
from ..upstream.executorch import (conv_backends_off, edge_compile_config, file_backed_constants,
                                  pattern_graphs_when_matchable, prelu_in_four_dims, xnnpack_partitioner)
from . import Job, weight_summary
from .fx_graph import module_outputs, module_paths, module_types, reexport, requantized, with_outputs, within
from .pte_precisions import PROGRAM

SUFFIX = ".pte"
KEEPS_STATE = True  # mutable buffers live in the method between execute() calls


def convert(job: Job) -> dict[str, Any]:
    """The ExportedProgram is already ExecuTorch's input IR: passed through."""
    link_or_copy(job.source / PROGRAM, job.workdir / PROGRAM)
    return {"method": "the ExportedProgram as it is"}


def attach(job: Job, raw: list[dict[str, Any]], app: list, pre: list, post: list,
           example: dict[str, np.ndarray]) -> dict[str, Any]:
    """quantize's program with the processing steps that have PyTorch modules inside, exported
    anew; the leading steps that have none (decoding, tokenizing) go to app_steps.onnx beside it,
    and the program takes what they make of the raw inputs (`example`: one raw example)."""
    from ..processing import app_model, spec
    from .onnx import APP_STEPS, _save, load

    inputs, feed = raw, example
    if app:  # their outputs feed the first step inside, or the model itself (named as its inputs)
        steps = app_model(raw, app, None if pre else [s["name"] for s in job.io["inputs"]])
        _save(steps, job.workdir / APP_STEPS)
        names = [value.name for value in steps.graph.output]
        feed = dict(zip(names, load(job.workdir / APP_STEPS, {"inputs": raw, "outputs": names})(example)))
        inputs = job.io["inputs"] if not pre else [  # the model's own inputs keep their dynamic dims
            {**spec(value), "shape": list(feed[value.name].shape), "dynamic": {}} for value in steps.graph.output]
    module = _Processed([s.torch() for s in pre], torch.export.load(job.source / PROGRAM).module(),
                        [s.torch() for s in post])
    tensors = tuple(torch.from_numpy(np.ascontiguousarray(feed[s["name"]])) for s in inputs)
    from ..support.model_builder import dynamic_shapes

    with torch.no_grad():
        program = torch.export.export(module, tensors, dynamic_shapes=None if pre else dynamic_shapes(inputs),
                                      strict=False)
    torch.export.save(program, job.workdir / PROGRAM)
    outputs = (post[-1].outputs("pte") if post else job.io["outputs"][:1]) + job.io["outputs"][1:]
    constants = sum(t.numel() * t.element_size() for step in [*module.pre, *module.post] for t in step.buffers())
    return {"inputs": inputs, "outputs": outputs, "example": feed, "constant_bytes": constants}


class _Processed(torch.nn.Module):
    """pre-processing modules -> the part's program -> post-processing of its first output."""

    def __init__(self, pre: list[torch.nn.Module], model: torch.nn.Module, post: list[torch.nn.Module]):
        super().__init__()
        self.pre, self.model, self.post = torch.nn.ModuleList(pre), model, torch.nn.ModuleList(post)

    def forward(self, *inputs: torch.Tensor):
        for step in self.pre:
            inputs = (step(*inputs),)
        outputs = self.model(*inputs)
        first = outputs[0]
        for step in self.post:
            first = step(first)
        return (*(first if isinstance(first, tuple) else (first,)), *outputs[1:])


def lower(job: Job) -> dict[str, Any]:
    from executorch.devtools.backend_debug import get_delegation_info

    loaded = [torch.export.load(job.source / PROGRAM)]  # read once; a retry reads it again
    stats = _program_stats(loaded[0])
    artifact = job.workdir / f"model{SUFFIX}"
    edge, left_out = _lowered(lambda: loaded.pop() if loaded else torch.export.load(job.source / PROGRAM),
                              job.fmt, artifact, repros=(job.workdir / "repro", job.io["inputs"]))
    delegation = get_delegation_info(edge.exported_program().graph_module)
    delegated, other = delegation.num_delegated_nodes, delegation.num_non_delegated_nodes
    stats["delegated_nodes"], stats["non_delegated_nodes"] = delegated, other
    stats["delegated_share"] = round(delegated / max(delegated + other, 1), 4)
    stats["non_delegated_ops"] = sorted({_op_name(n.target) for n in edge.exported_program().graph.nodes
                                         if n.op == "call_function" and _op_name(n.target)
                                         not in ("executorch_call_delegate", "getitem")})
    stats["operator_modules"] = _operator_modules(edge.exported_program())
    stats["kernel_libraries"] = sorted({KERNEL_LIBRARIES[n.target.namespace] for n in edge.exported_program().graph.nodes
                                        if getattr(n.target, "namespace", None) in KERNEL_LIBRARIES})
    stats["planned_input_shapes"] = _planned_shapes(artifact)
    stats["left_out_of_delegate"] = left_out
    stats["warnings"] = _narrowed_dims(job.io["inputs"], stats["planned_input_shapes"]) + [
        f"module {failed['module']} left out of the XNNPACK delegate, on ExecuTorch's portable kernels: "
        f"lowering it failed ({failed['error']}); upstream repro: {failed['repro']}" for failed in left_out] + [
        f"the app must link ExecuTorch's {library} kernels ({library}_ops_lib): operators outside the delegate use them"
        for library in stats["kernel_libraries"]]
    (job.workdir / "program_stats.json").write_text(json.dumps(stats, indent=1))
    return {"artifact": artifact.name, "delegated_share": stats["delegated_share"],
            "warnings": stats["warnings"], "left_out_of_delegate": [f["module"] for f in left_out]}


KERNEL_LIBRARIES = {"quantized_decomposed": "quantized"}  # op namespace -> ExecuTorch kernel library it needs
RETRIES = 4  # modules left out of the delegate before a lowering failure is the user's to fix


def _lowered(load: Callable[[], torch.export.ExportedProgram], fmt, path: Path,
             repros: tuple[Path, list] | None = None) -> tuple[Any, list[dict]]:
    """_to_executorch on a freshly loaded program; when the XNNPACK delegate fails on a node of
    a module, again with that module left out of the delegate (its ops on the portable kernels).
    Returns the edge program and the modules left out, each with the error that made it so.
    `repros` (folder, input specs): each failure leaves a repro there (stages/support/repro.py)."""
    left_out: list[dict] = []
    while True:
        modules = [failed["module"] for failed in left_out]
        try:
            edge = _to_executorch([load()], fmt, path, lambda node: within(node, modules))
            return edge, left_out
        except PipelineError as exc:
            failed = {"module": exc.module, "error": exc.message.split(": ", 1)[-1][:300]}
            if repros:
                failed["repro"] = _repro(repros, load(), fmt, exc)
            if (not (fmt.xnnpack and exc.module and _in_delegate(exc.__cause__)) or exc.module in modules
                    or len(left_out) == RETRIES):
                if repros:
                    exc.fix += f"; a repro for ExecuTorch's maintainers is in the part's {failed['repro']}"
                raise
            logging.getLogger(__name__).warning("lowering failed on module %s: retrying with it left out "
                                                "of the XNNPACK delegate", exc.module)
            left_out.append(failed)


def _in_delegate(exc: BaseException | None) -> bool:
    """Whether the failure came from inside the XNNPACK backend (its partitioner or passes): what
    leaving a module out of its delegate can avoid (a missing kernel, say, it cannot)."""
    return any("backends/xnnpack" in frame.f_code.co_filename for frame in traceback_frames(exc))


STOCK_LOWERING = """from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
from executorch.exir import to_edge_transform_and_lower

partitioners = [XnnpackPartitioner()] if XNNPACK else []
to_edge_transform_and_lower(program, partitioner=partitioners).to_executorch()
"""


def _repro(repros: tuple[Path, list], program: torch.export.ExportedProgram, fmt, exc: PipelineError) -> str:
    """The failure as a folder an ExecuTorch maintainer can run (stages/support/repro.py), with
    the stock lowering call: no workaround of ours."""
    from ..support.repro import failure_repro

    folder, specs = repros
    return failure_repro(folder, program, specs, exc, "ExecuTorch lowering", ("torch", "executorch", "torchao"),
                         STOCK_LOWERING.replace("XNNPACK", str(bool(fmt.xnnpack))))


def _to_executorch(programs: list[torch.export.ExportedProgram], fmt, path: Path,
                   left_out: Callable[[torch.fx.Node], bool] | None = None) -> Any:
    """The edge program, its .pte written to path: XNNPACK-delegated where the format says so.
    `programs` holds the one program to lower; it is emptied once lowered, so the source's
    weights are not kept beside the delegate's copy of them, and the .pte goes to the file
    without being joined into one buffer first (its size again in memory)."""
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass
    import executorch.kernels.quantized  # noqa: F401  out variants of quantize ops XNNPACK leaves

    partitioners = [xnnpack_partitioner(left_out)] if fmt.xnnpack else []
    # upstream bugs: else a dynamic batch is planned for 15 rows; the delegate's copy of every
    # weight is held in memory until the .pte is written; XNNPACK's pattern graphs are built
    # for models without the operator they match
    with conv_backends_off(), file_backed_constants(path.parent / ".xnnpack-constants"), pattern_graphs_when_matchable():
        try:
            edge = to_edge_transform_and_lower(programs[0], partitioner=partitioners,
                                               transform_passes=[prelu_in_four_dims] if fmt.xnnpack else None,
                                               compile_config=edge_compile_config(programs[0]))
        except Exception as exc:
            raise lowering_failure("ExecuTorch lowering", exc, programs[0]) from exc
        programs.clear()
        release()
        try:
            executorch_program = edge.to_executorch(ExecutorchBackendConfig(
                passes=[InitializedMutableBufferPass(_mutable_buffers(edge.exported_program()))],
                do_quant_fusion_and_const_prop=_torchao_left(edge.exported_program())))
            with open(path, "wb") as out:
                executorch_program.write_to_file(out)
        except Exception as exc:
            raise lowering_failure("ExecuTorch lowering", exc, edge.exported_program()) from exc
    return edge


def _torchao_left(program: torch.export.ExportedProgram) -> bool:
    """Whether torchao's quantize ops are left outside the delegate (a 4-bit embedding table):
    they have no ExecuTorch kernel, and ExecuTorch's quant fusion rewrites them into its quantized
    kernels (dequantize_affine + embedding -> quantized_decomposed.embedding_4bit). Only then: the
    fusion would also rewrite the PT2E patterns XNNPACK leaves, which run as they are today."""
    return any(getattr(n.target, "namespace", None) == "torchao" for n in program.graph.nodes)


def reference(job: Job) -> tuple[Callable, dict[str, str]]:
    """The quantized program run by PyTorch itself (quantize/dequantize as float arithmetic, fp16
    in PyTorch's kernels), returning its outputs, every module's output, and every module's
    output as the next layer reads it (re-quantized); and module types."""
    graph_module = torch.export.load(job.source / PROGRAM).module()
    points = module_outputs(graph_module.graph)
    types = {path: kind for node in graph_module.graph.nodes for path, kind in module_types(node).items()}
    with_outputs(graph_module, [*points.values(), *map(requantized, points.values())])
    count, modules = len(job.io["outputs"]), len(points)

    def run(feed: dict[str, np.ndarray]):
        inputs = [torch.from_numpy(feed[spec["name"]]) for spec in job.io["inputs"]]
        with torch.no_grad():
            values = [v.float().numpy() for v in torch.fx.Interpreter(graph_module).run(*inputs)]
        return (values[:count], dict(zip(points, values[count:count + modules])),
                dict(zip(points, values[count + modules:])))

    return run, types


def prefix_artifact(job: Job, module: str) -> Path:
    """The program up to `module`'s output, lowered like the artifact, as a file in job.workdir."""
    graph_module = torch.export.load(job.source / PROGRAM).module()
    with_outputs(graph_module, [requantized(module_outputs(graph_module.graph)[module])], replace=True)
    path = job.workdir / f"prefix{SUFFIX}"
    _lowered(lambda: reexport(graph_module, job.io["inputs"]), job.fmt, path)
    return path


def _mutable_buffers(program: torch.export.ExportedProgram) -> list[str]:
    """Placeholders of the buffers the program updates: serialized with their initial values
    (ExecuTorch otherwise ships only their shape, and a stream would start from garbage)."""
    signature = program.graph_signature
    mutated = set(signature.buffers_to_mutate.values())
    return [spec.arg.name for spec in signature.input_specs if spec.target in mutated]


def _planned_shapes(artifact: Path) -> list[list[int]]:
    """The largest input shapes ExecuTorch planned memory for (the bound of dynamic dims)."""
    from executorch.runtime import Runtime

    meta = Runtime.get().load_program(artifact).load_method("forward").metadata
    return [list(meta.input_tensor_meta(i).sizes()) for i in range(meta.num_inputs())]


def _narrowed_dims(specs: list[dict[str, Any]], planned: list[list[int]]) -> list[str]:
    """Dynamic dims that lowering bounded below the spec's max (a guard narrowed the range)."""
    return [f"input '{spec['name']}' dim {dim} ({name}) is planned up to {shape[int(dim)]}, "
            f"not {spec['max']}: feed at most {shape[int(dim)]} per call"
            for spec, shape in zip(specs, planned) for dim, name in spec["dynamic"].items()
            if shape[int(dim)] < int(spec["max"])]


def _program_stats(program: torch.export.ExportedProgram) -> dict[str, Any]:
    """Weights by dtype and quantize/dequantize op counts of the program being serialized."""
    by_dtype: Counter[str] = Counter()
    # unused originals are not shipped; the state a program writes (a KV cache) is no weight
    for tensor in used_tensors(program, leave_out=set(mutated_buffers(program))):
        for dtype, size in _stored(tensor):
            by_dtype[dtype] += size
    targets = Counter(str(n.target) for n in program.graph.nodes if n.op == "call_function")
    quantize_ops = sum(c for t, c in targets.items() if QUANTIZES.search(t) and "dequantize" not in t)
    dequantize_ops = sum(c for t, c in targets.items() if QUANTIZES.search(t) and "dequantize" in t)
    return {**weight_summary(dict(by_dtype), "the program handed to ExecuTorch lowering "
                             "(the backend may store some weights wider: see bytes_per_parameter)"),
            "quantize_ops": quantize_ops, "dequantize_ops": dequantize_ops,
            "graph_nodes": sum(targets.values())}


QUANTIZES = re.compile(r"quantize_(per|affine)")  # PT2E's quantize_per_* (quantized_decomposed), torchao's


def _stored(tensor: torch.Tensor) -> list[tuple[str, int]]:
    """(dtype, bytes) of a weight as stored: a torchao quantized tensor (int4 values held in int8,
    its scales and zero points) by its parts, its values at their target width."""
    if not hasattr(tensor, "__tensor_flatten__"):
        return [(str(tensor.dtype).removeprefix("torch."), tensor.numel() * tensor.element_size())]
    parts = []
    for name in tensor.__tensor_flatten__()[0]:
        inner = getattr(tensor, name)
        if name == "qdata" and getattr(tensor, "target_dtype", None) is not None:
            dtype = str(tensor.target_dtype).removeprefix("torch.")  # int4: torch.iinfo takes no sub-byte type
            parts.append((dtype, (inner.numel() * int(re.sub(r"\D", "", dtype)) + 7) // 8))
        else:
            parts += _stored(inner)
    return parts


def _operator_modules(program: torch.export.ExportedProgram) -> dict[str, list[str]]:
    """The model's modules each operator outside the delegate comes from, by operator name, so
    a runtime failure in `aten::scalar_tensor.out` can name the layer it is in."""
    found: dict[str, set[str]] = {}
    for node in program.graph.nodes:
        paths = module_paths(node) if node.op == "call_function" else []
        if paths:
            found.setdefault(_op_name(node.target), set()).add(paths[-1])
    return {op: sorted(paths) for op, paths in sorted(found.items())}


def _op_name(target: Any) -> str:
    """aten.convolution.default (an OpOverload, or an edge op: 'aten.convolution.default' by
    its __name__, never its str, which appends the schema) -> 'convolution'; plain callables by
    their name."""
    parts = str(getattr(target, "__name__", target)).split(".")
    return parts[-2] if len(parts) >= 2 else parts[0]


def runtime(as_written: bool = False) -> str:
    """The runtime load() runs an artifact in, as a report names it."""
    from importlib.metadata import version

    return f"executorch {version('executorch')} runtime, XNNPACK"


def load(artifact: Path, io: dict[str, Any], threads: int | None = None, as_written: bool = False
         ) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
    """as_written is accepted for the common interface: XNNPACK's int8 kernels accumulate in
    int32 on every CPU, so the host's own kernels already compute the program as written."""
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
    from executorch.runtime import Runtime

    from ..runtimes.device_worker import dynamic_batch, load_kernel_libraries, pte_runner

    load_kernel_libraries(str(artifact))
    if threads:
        _unsafe_reset_threadpool(threads)  # XNNPACK's pool: every call of this process
    method = Runtime.get().load_program(Path(artifact)).load_method("forward")
    return pte_runner(method.execute, method.metadata, [spec["name"] for spec in io["inputs"]],
                      dynamic_batch(io["inputs"]), str(artifact))


def op_times(artifact: Path, io: dict[str, Any], feed: dict[str, np.ndarray], threads: int, calls: int,
             workdir: Path) -> list[dict[str, Any]]:
    """ExecuTorch's ETDump over `calls` runs of the artifact, read with its Inspector: one entry
    per operator run, XNNPACK's own operators (inside a delegate) and the portable kernels'."""
    from executorch.devtools import Inspector
    from executorch.extension.pybindings.portable_lib import _load_for_executorch, _unsafe_reset_threadpool

    from ..runtimes.device_worker import load_kernel_libraries

    _unsafe_reset_threadpool(threads)
    load_kernel_libraries(str(artifact))
    module = _load_for_executorch(str(artifact), enable_etdump=True)
    inputs = [torch.from_numpy(np.ascontiguousarray(feed[spec["name"]])) for spec in io["inputs"]]
    for _ in range(calls):
        module.forward(inputs)
    dump = workdir / "profile.etdump"
    module.write_etdump_result_to_file(str(dump))
    inspector = Inspector(etdump_path=str(dump))
    dump.unlink()
    found = []
    for block in inspector.event_blocks:
        for event in block.events if block.name == "Execute" else ():
            name = event.name or ""
            if not event.perf_data or name in PROFILE_FRAMES:
                continue
            where = "XNNPACK" if event.is_delegated_op else "portable kernels"
            op = name.removeprefix("native_call_").rsplit(" #", 1)[0]
            found += [{"op": op, "where": where, "us": ms * 1000} for ms in event.perf_data.raw]
    return found


PROFILE_FRAMES = {"Method::execute", "DELEGATE_CALL", "OPERATOR_CALL"}  # spans around the operators


def inspect(artifact: Path) -> dict[str, Any]:
    return json.loads((artifact.parent / "program_stats.json").read_text())

