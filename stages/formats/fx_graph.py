"""Graph surgery on an exported program's module, keeping each node's provenance.

Every node of `program.module()` knows the module it came from (`nn_module_stack`). A plain
re-export of a modified module loses that (every node then comes from the wrapper), so programs
are re-exported by replaying their graph node by node with that metadata preserved: the module
paths survive half precision and PT2E, and diagnosis, mixed precision and error messages can name
`blocks.0.norm` rather than `node_17`.
"""
from __future__ import annotations

import operator
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch.fx import GraphModule, Node
from torch.fx import traceback as fx_traceback

from ..support.model_builder import PART_PREFIX, dynamic_shapes, example_inputs

HALF, FLOAT = torch.float16, torch.float32


def module_paths(node: Node) -> list[str]:
    """The modules a node comes from, outermost first, as the user names them (`blocks.0.norm`)."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [str(path).removeprefix("L['self'].") for path, _ in stack.values()]
    return [p.removeprefix(PART_PREFIX) for p in paths if p.startswith(PART_PREFIX)]


def module_types(node: Node) -> dict[str, str]:
    """module path -> class name, for the modules a node comes from."""
    stack = node.meta.get("nn_module_stack") or {}
    return {str(path).removeprefix("L['self'].").removeprefix(PART_PREFIX): str(kind).rsplit(".", 1)[-1]
            for path, kind in stack.values() if str(path).startswith(PART_PREFIX)}


def within(node: Node, modules: Iterable[str]) -> bool:
    """Whether the node comes from one of the modules (or from inside one)."""
    return bool(set(module_paths(node)) & set(modules))


class Replay(torch.nn.Module):
    """forward(*inputs) runs a GraphModule's graph node by node with each node's metadata
    preserved, so a re-export inherits the module paths of the graph it replays."""

    def __init__(self, graph_module: GraphModule):
        super().__init__()
        self.graph_module = graph_module

    def forward(self, *inputs):
        with fx_traceback.preserve_node_meta():
            return tuple(torch.fx.Interpreter(self.graph_module).run(*inputs))


def reexport(graph_module: GraphModule, specs: list[Mapping[str, Any]],
             path: Path | None = None) -> torch.export.ExportedProgram:
    """The graph module as an ExportedProgram with the specs' dynamic dims, provenance kept."""
    with torch.no_grad():
        program = torch.export.export(Replay(graph_module), example_inputs(specs),
                                      dynamic_shapes=dynamic_shapes(specs), strict=False)
    if path is not None:
        torch.export.save(program, path)
    return program


def to_half(graph_module: GraphModule, keep_float: Callable[[Node], bool]) -> GraphModule:
    """Half-precision weights and compute, float32 inputs and outputs as an app feeds them; the
    nodes keep_float names compute in float32 with float32 weights, with casts at their edges."""
    graph = graph_module.graph
    half = {node: node.op == "call_function" and not keep_float(node) for node in graph.nodes}
    for node in graph.nodes:  # getitem unpacks the node before it: same precision
        if node.target is operator.getitem and isinstance(node.args[0], Node):
            half[node] = half[node.args[0]]
    for node in graph.nodes:  # weights, buffers, constants: half where a half node uses them
        value = _attribute(graph_module, node.target) if node.op == "get_attr" else None
        if isinstance(value, torch.Tensor) and value.dtype == FLOAT and any(half[u] for u in node.users):
            _set_attribute(graph_module, node.target, value.half())
    casts: dict[tuple[Node, torch.dtype], Node] = {}

    def cast(value: Node, dtype: torch.dtype, before: Node) -> Node:
        if (value, dtype) not in casts:
            with graph.inserting_before(before):
                casts[value, dtype] = graph.call_function(torch.ops.aten._to_copy.default, (value,),
                                                          {"dtype": dtype})
            casts[value, dtype].meta.update({k: v for k, v in before.meta.items() if k != "val"})
        return casts[value, dtype]

    for node in list(graph.nodes):
        if node.op == "output":
            node.args = torch.fx.node.map_arg(node.args, lambda v: cast(v, FLOAT, node)
                                              if _dtype(graph_module, v, half) == HALF else v)
        elif node.op == "call_function" and node.target is not operator.getitem:
            want = HALF if half[node] else FLOAT
            if half[node]:  # factories and explicit casts to float32 (arange, full, .float())
                node.args, node.kwargs = _swap_dtype(node.args), _swap_dtype(node.kwargs)

            def fix(value: Node, want=want, node=node) -> Node:
                have = _dtype(graph_module, value, half)
                return cast(value, want, node) if have in (HALF, FLOAT) and have != want else value

            node.args, node.kwargs = torch.fx.node.map_arg((node.args, node.kwargs), fix)
    graph.lint()
    graph_module.recompile()
    return graph_module


def module_outputs(graph: torch.fx.Graph) -> dict[str, Node]:
    """Each module's output node, in the order the graph computes them; only modules whose nodes
    leave exactly one tensor (a module called twice, or returning a tuple, is left out)."""
    members: dict[str, set[Node]] = {}
    for node in graph.nodes:
        for path in module_paths(node) if node.op == "call_function" else ():
            members.setdefault(path, set()).add(node)
    found: dict[str, Node] = {}
    for path, nodes in members.items():
        leaving = [n for n in nodes if isinstance(n.meta.get("val"), torch.Tensor)
                   and any(user not in nodes for user in _readers(n))]
        if len(leaving) == 1:
            found[path] = leaving[0]
    order = {node: index for index, node in enumerate(graph.nodes)}
    return dict(sorted(found.items(), key=lambda item: order[item[1]]))


def _is_qdq(node: Node) -> bool:
    return "quantize_per" in str(node.target)  # quantize_per_* and dequantize_per_*


def _readers(node: Node) -> set[Node]:
    """The nodes that read node's value, seen through the quantize/dequantize nodes PT2E inserts
    (they belong to no module)."""
    found: set[Node] = set()
    for user in node.users:
        found |= _readers(user) if _is_qdq(user) else {user}
    return found


def requantized(node: Node) -> Node:
    """The value as the next layer reads it: the dequantize after node's quantize (PT2E puts a
    pair after every quantized layer), else node itself."""
    users = list(node.users)
    if len(users) == 1 and "quantize_per" in str(users[0].target):
        dequantized = [u for u in users[0].users if "dequantize_per" in str(u.target)]
        if dequantized:
            return dequantized[0]
    return node


def with_outputs(graph_module: GraphModule, extra: list[Node], replace: bool = False) -> GraphModule:
    """The graph returning `extra` after its own outputs (or instead of them, dead code removed)."""
    output = next(node for node in graph_module.graph.nodes if node.op == "output")
    results = () if replace else output.args[0]
    results = results if isinstance(results, (tuple, list)) else (results,)
    output.args = ((*results, *extra),)
    if replace:
        graph_module.graph.eliminate_dead_code()
    graph_module.graph._codegen = torch.fx.graph.CodeGen()  # flat inputs and outputs, no pytree specs
    graph_module.recompile()
    return graph_module


def _dtype(graph_module: GraphModule, node: Node, half: dict[Node, bool]) -> torch.dtype | None:
    """The dtype a node's tensor has after the conversion (None when it is not one tensor)."""
    if node.op == "get_attr":
        value = _attribute(graph_module, node.target)
        return value.dtype if isinstance(value, torch.Tensor) else None
    value = node.meta.get("val")
    if node.target is operator.getitem and isinstance(node.args[0], Node):
        values = node.args[0].meta.get("val")
        value = values[node.args[1]] if isinstance(values, (tuple, list)) else None
    if not isinstance(value, torch.Tensor):
        return None
    if node.op == "call_function" and value.dtype == FLOAT and half.get(node):
        return HALF
    return value.dtype


def _swap_dtype(value: Any) -> Any:
    if value is FLOAT:
        return HALF
    if isinstance(value, (tuple, list)):
        return type(value)(_swap_dtype(v) for v in value)
    if isinstance(value, dict):
        return {k: _swap_dtype(v) for k, v in value.items()}
    return value


def _attribute(module: torch.nn.Module, target: str) -> Any:
    owner, _, name = target.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, name)


def _set_attribute(module: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    owner, _, name = target.rpartition(".")
    holder = module.get_submodule(owner) if owner else module
    if isinstance(getattr(holder, name), torch.nn.Parameter):
        value = torch.nn.Parameter(value, requires_grad=False)
    setattr(holder, name, value)
