"""Checkpoints that carry their own graph (.pt2, TorchScript .pt/.jit, .ptl) as models with no
class and no model entry (`model=graph`): the part is read from the file, with the input
shapes the user gives where the file records none, and TorchScript is converted to an
ExportedProgram with torch's own converter (torch._export.converter.TS2EPConverter).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import torch

from pipelines.errors import PipelineError, root_cause

from ..upstream.torch_export import without_grad
from .checkpoint_formats import LoadedCheckpoint, load_checkpoint_file

GRAPH_FIX = ("give the input shapes: model=graph model.checkpoint=<file> 'model.inputs=[[1,1,750]]' "
             "(a spec per input: [shape] or {shape: [...], dtype: int64, dynamic: {0: batch}})")


def graph_part(model: Mapping[str, Any]) -> dict[str, Any]:
    """The one part of a graph checkpoint (`model=graph`): its inputs (names and recorded shapes
    from the file, else `model.inputs`) and its outputs, as a model entry would declare them."""
    loaded = load_checkpoint_file(model["checkpoint"], allow_pickle=model.get("allow_pickle", False))
    stem = re.sub(r"\W+", "_", Path(model["checkpoint"]).stem).strip("_") or "graph"
    return {"name": stem, "inputs": input_specs(loaded, model.get("inputs"), model["checkpoint"]),
            "outputs": _signature(loaded, model["checkpoint"])[2]}


def input_specs(loaded: LoadedCheckpoint, given: list[Any] | None, source: str) -> list[dict[str, Any]]:
    """The graph's input specs, every field set: names from the file, shapes as recorded there
    or `given` (model.inputs)."""
    from omegaconf import OmegaConf

    from pipelines.schema import TensorSpec

    names, recorded, _ = _signature(loaded, source)
    if given is None and any(spec is None for spec in recorded):
        raise PipelineError(f"model=graph: {source} records no input shapes (inputs {', '.join(names)})",
                            stage="load_checkpoint", fix=GRAPH_FIX)
    given = given if given is not None else recorded
    if len(given) != len(names):
        raise PipelineError(f"model.inputs gives {len(given)} input(s), but {Path(source).name}'s forward takes "
                            f"{len(names)} ({', '.join(names)})", stage="load_checkpoint",
                            fix="give one shape (or spec) per input, in the forward's order")
    return [OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(TensorSpec), _spec(name, spec)),
                                   enum_to_str=True) for name, spec in zip(names, given)]


def _signature(loaded: LoadedCheckpoint, source: str) -> tuple[list[str], list[Any], list[str]]:
    """Input names, recorded input specs (None where unknown) and output names of the file's graph."""
    if loaded.kind == "torchscript":
        return _script_signature(loaded.script)
    if loaded.kind == "exported_program":
        return _program_signature(loaded.program)
    raise PipelineError(f"model=graph: {source} holds weights ({loaded.kind}), not a graph", stage="load_checkpoint",
                        fix="give a model entry with its architecture (model.arch), or a .pt2/TorchScript file")


def torchscript_program(loaded: LoadedCheckpoint, given: list[Any], source: str) -> torch.export.ExportedProgram:
    """The scripted module as an ExportedProgram, converted with example inputs of the `given`
    shapes; a graph the converter cannot take names its TorchScript nodes, their source lines
    and the submodules that hold them."""
    from torch._export.converter import TS2EPConverter

    from .model_builder import example_inputs

    sample = example_inputs(input_specs(loaded, given, source))  # dynamic dims not 1: none specialises
    converter = TS2EPConverter(loaded.script, sample)
    unsupported = _unsupported_nodes(converter, loaded.script)
    if unsupported:
        raise PipelineError(f"{source}: torch's TorchScript converter cannot take {len(unsupported)} node(s): "
                            + "; ".join(unsupported), stage="load_checkpoint",
                            fix="export the model from its Python class (a model entry with model.arch), or "
                                "script it without the nodes named (no attribute writes inside if/loops)")
    try:
        program = converter.convert()
    except Exception as exc:
        raise PipelineError(f"{source}: converting TorchScript to an ExportedProgram failed: {root_cause(exc)}",
                            stage="load_checkpoint", fix="export the model from its Python class "
                                                         "(a model entry with model.arch)") from exc
    return without_grad(program)


def _script_signature(script) -> tuple[list[str], list[None], list[str]]:
    """TorchScript records its arguments' names but no shapes."""
    schema = script.forward.schema
    names = [argument.name for argument in schema.arguments[1:]]
    returned = schema.returns[0].type if schema.returns else None
    count = len(returned.elements()) if isinstance(returned, torch.TupleType) else 1
    return names, [None] * len(names), _output_names(count)


def _program_signature(program: torch.export.ExportedProgram) -> tuple[list[str], list[Any], list[str]]:
    """A .pt2 records its user inputs, their example shapes (since torch 2.5) and which dims it
    was exported dynamic, with their bounds."""
    names = list(program.graph_signature.user_inputs)
    examples = getattr(program, "example_inputs", None)
    args = list(examples[0]) if examples else []
    if len(args) != len(names) or not all(isinstance(t, torch.Tensor) for t in args):
        return names, [None] * len(names), _output_names(len(program.graph_signature.user_outputs))
    values = {node.name: node.meta.get("val") for node in program.graph.nodes if node.op == "placeholder"}
    recorded = []
    for name, example in zip(names, args):
        spec = {"shape": list(example.shape), "dtype": str(example.dtype).removeprefix("torch.")}
        # dims exported dynamic with an upper bound stay dynamic; an unbounded one (Dim.AUTO, as
        # TS2EPConverter exports every dim) is kept at its example size: ExecuTorch plans memory
        # for the bound. model.inputs with `dynamic` and `max` keeps any dim dynamic.
        bounds = {axis: program.range_constraints.get(dim.node.expr)
                  for axis, dim in enumerate(getattr(values.get(name), "shape", ())) if isinstance(dim, torch.SymInt)}
        bounded = {axis: int(r.upper) for axis, r in bounds.items() if r is not None and r.upper.is_Integer}
        if bounded:
            spec["dynamic"] = {axis: "batch" if axis == 0 else f"dim{axis}" for axis in bounded}
            spec["max"] = min(bounded.values())
        recorded.append(spec)
    return names, recorded, _output_names(len(program.graph_signature.user_outputs))


def _output_names(count: int) -> list[str]:
    return ["output"] if count == 1 else [f"output_{k}" for k in range(count)]


def _spec(name: str, given: Any) -> dict[str, Any]:
    """A shape ([1, 1, 750]) or a spec mapping as an input spec (float32, static unless given)."""
    spec = dict(given) if isinstance(given, Mapping) else {"shape": list(given)}
    if "shape" not in spec or not all(isinstance(d, int) and d > 0 for d in spec["shape"]):
        raise PipelineError(f"model.inputs: input {name!r} has no shape of positive integers ({given!r})",
                            stage="load_checkpoint", fix=GRAPH_FIX)
    return {**spec, "name": name}


def _unsupported_nodes(converter, script) -> list[str]:
    """The nodes `converter` (a TS2EPConverter of `script`) would stop at, each with its source
    line and the submodule whose code holds it."""
    from torch._export.converter import ExplainTS2FXGraphConverter, get_block_to_lifted_attrs

    blocks, fqns = get_block_to_lifted_attrs(converter.ts_graph)
    explainer = ExplainTS2FXGraphConverter(converter.ts_graph, converter.name_to_param, converter.name_to_buffer,
                                           blocks, converter.name_to_non_tensor_attributes,
                                           converter.name_to_constant, fqns)
    explainer.explain()
    owners = _owners(script)
    found, held = [], set()
    for node in explainer.unsupported_node_list:
        owner = owners.get((node.kind(), node.sourceRange()))
        found.append(f"{node.kind()} at {_source_line(node)} in "
                     f"{'submodule ' + repr(owner) if owner else 'the top module'}")
        held.add(owner.split(".")[0] if owner else None)
    free = [name for name, _ in script.named_children() if name not in held]
    if found and free:
        found[-1] += f" (submodules holding none of these nodes: {', '.join(free)})"
    return found


def _source_line(node) -> str:
    """`File "x.py", line 7: if x.sum() > 0:` from the node's source range (its first marked line)."""
    lines = node.sourceRange().splitlines()
    if not lines:
        return "an unknown line"
    marked = next((lines[k - 1].strip() for k in range(2, len(lines)) if set(lines[k].strip()) <= set("~^")
                   and lines[k].strip()), "")
    return lines[0].strip() + (f": {marked}" if marked else "")


def _owners(script) -> dict[tuple[str, str], str]:
    """(node kind, source range) -> the deepest submodule whose own forward holds such a node."""
    owners: dict[tuple[str, str], str] = {}
    for name, module in sorted(script.named_modules(), key=lambda item: len(item[0])):
        try:
            graph = module.forward.graph
        except (AttributeError, RuntimeError):
            continue
        for node in _all_nodes(graph.nodes()):
            owners[node.kind(), node.sourceRange()] = name
    return owners


def _all_nodes(nodes):
    for node in nodes:
        yield node
        for block in node.blocks():
            yield from _all_nodes(block.nodes())
