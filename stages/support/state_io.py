"""State as I/O: the buffers a part's forward updates in place, lifted into explicit inputs
`state_in_<name>` and outputs `state_out_<name>` that the caller carries from call to call.

Generic: the buffers come from torch.export's graph signature, never from the architecture.
wrap writes the lifted program to STATE_IO/; convert `select`s the program a format ships.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from pipelines.errors import PipelineError

from .model_builder import PART_PREFIX, dynamic_shapes, example_inputs

STATE_IO = "state_io"  # wrap's sub-directory: the state-lifted program.pt2 and its io.json


def mutated_buffers(program: torch.export.ExportedProgram) -> list[str]:
    """Paths of the buffers forward updates (the functional graph records them as outputs). A
    graph with no operator that can write its arguments updates none but those its signature
    already records: then it is not functionalized (0.3-0.5 s a program) to learn that."""
    if any(_may_write(node) for node in program.graph.nodes):
        program = program.run_decompositions({})
    return sorted(set(program.graph_signature.buffers_to_mutate.values()))


def _may_write(node: torch.fx.Node) -> bool:
    """Whether a node may write a tensor it is given: an in-place or out= operator, or any call
    that is neither an ATen operator nor Python's arithmetic on sizes (a higher-order op)."""
    if node.op != "call_function":
        return False
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target._schema.is_mutable
    return getattr(node.target, "__module__", None) not in ("_operator", "math", "builtins")


class StateAsIO(nn.Module):
    """forward(*inputs, *states) -> (*outputs, *new states): the module run on states given as
    inputs in place of its buffers, which are left untouched."""

    def __init__(self, module: nn.Module, buffers: list[str]):
        super().__init__()
        self.module = module
        self.names = buffers

    def forward(self, *args: torch.Tensor):
        count = len(args) - len(self.names)
        states = {name: value.clone() for name, value in zip(self.names, args[count:])}
        outputs = torch.func.functional_call(self.module, states, args[:count], strict=False)
        return (*outputs, *states.values())  # the clones, updated in place by forward


def refuse_rebound_buffers(module: nn.Module, before: Mapping[str, torch.Tensor], part: str) -> None:
    """A forward that assigns new tensors to buffers (self.cache = ...) exports as if the state
    never changed: torch.export records no update. Refused, never exported silently wrong."""
    rebound = [name.removeprefix(PART_PREFIX) for name, value in module.named_buffers()
               if before.get(name) is not value]
    if rebound:
        raise PipelineError(f"part '{part}' assigns new tensors to buffers {rebound} in forward; "
                            "torch.export records no state update for that, so every call of the "
                            "artifact would start from the initial state",
                            fix="update the buffers in place (self.cache.copy_(new), .add_(...)): "
                                "the state then becomes inputs/outputs (ONNX) or stays inside (.pte)")


def _state_name(buffer: str) -> str:
    return buffer.removeprefix(PART_PREFIX).replace(".", "_")


def _initial(value: torch.Tensor) -> Any:
    """A state's initial value as an app reads it: "zeros", or the values."""
    return "zeros" if not value.any() else value.tolist()


def lift(module: nn.Module, buffers: list[str], specs: list[Mapping[str, Any]], strict: bool
         ) -> tuple[torch.export.ExportedProgram, list[dict[str, Any]], list[dict[str, Any]]]:
    """The program with `buffers` as state I/O, the state inputs' specs, and the state entries
    ({input, output, buffer, shape, dtype, initial}) recorded beside the artifact."""
    initial = [module.get_buffer(name).detach().clone() for name in buffers]
    state, state_specs = [], []
    for name, value in zip(buffers, initial):
        dtype, shape, short = str(value.dtype).removeprefix("torch."), list(value.shape), _state_name(name)
        state_specs.append({"name": f"state_in_{short}", "shape": shape, "dtype": dtype,
                            "dynamic": {}, "kwarg": None, "low": -1.0, "high": 1.0, "max": 1})
        state.append({"input": f"state_in_{short}", "output": f"state_out_{short}",
                      "buffer": name.removeprefix(PART_PREFIX), "shape": shape, "dtype": dtype,
                      "initial": _initial(value)})
    all_specs = [*specs, *state_specs]
    with torch.no_grad():
        program = torch.export.export(StateAsIO(module, buffers), (*example_inputs(specs), *initial),
                                      dynamic_shapes=dynamic_shapes(all_specs), strict=strict)
    return program, state_specs, state


def select(wrap_dir: Path, mode: str, fmt: str, keeps_state: bool) -> tuple[Path, dict[str, Any]]:
    """The directory of the wrapped program a format ships, and its io: `mode` auto is internal
    where the format keeps mutable state (keeps_state), io elsewhere."""
    io = json.loads((wrap_dir / "io.json").read_text())
    if not io["internal_state"]:
        return wrap_dir, io
    resolved = mode if mode != "auto" else "internal" if keeps_state else "io"
    if resolved == "io":
        return wrap_dir / STATE_IO, json.loads((wrap_dir / STATE_IO / "io.json").read_text())
    if not keeps_state:
        names = [name.removeprefix(PART_PREFIX) for name in io["internal_state"]]
        raise PipelineError(f"forward updates buffers {names}, and {fmt} keeps no state between "
                            "calls: with wrap.state=internal every call would start from the "
                            "initial state and the artifact would be silently wrong",
                            fix="use wrap.state=io (or auto): the state becomes inputs state_in_* "
                                "and outputs state_out_* that the app carries from call to call")
    return wrap_dir, io


def state_nodes(graph: torch.fx.Graph, io: Mapping[str, Any]) -> set[torch.fx.Node]:
    """The nodes that read or write the state (state inputs and outputs, or the buffers forward
    updates): a quantizer leaves them in float, so the state is carried unquantized."""
    state_inputs = {s["input"] for s in io["state"]}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    sources = {n for n, spec in zip(placeholders, io["inputs"]) if spec["name"] in state_inputs}
    sources |= {n for n in graph.nodes if n.op == "get_attr" and n.target in io["internal_state"]}
    sources = _copies_of(sources)
    results: list[torch.fx.Node] = []
    torch.fx.node.map_arg(next(n for n in graph.nodes if n.op == "output").args[0], results.append)
    sinks = {results[io["outputs"].index(s["output"])] for s in io["state"]}
    sinks |= {n.args[1] for n in graph.nodes
              if n.target == torch.ops.aten.copy_.default and n.args[0] in sources}
    readers = {user for node in sources for user in node.users if user.op == "call_function"}
    return readers - sources | _originals_of(sinks)


PASS_THROUGH = (torch.ops.aten.clone.default, torch.ops.aten.detach.default,
                torch.ops.aten.alias.default)


def _copies_of(nodes: set[torch.fx.Node]) -> set[torch.fx.Node]:
    """The nodes and the pass-through ops (clone, detach) applied to them."""
    found, todo = set(nodes), list(nodes)
    while todo:
        for user in todo.pop().users:
            if user.target in PASS_THROUGH and user not in found:
                found.add(user)
                todo.append(user)
    return found


def _originals_of(nodes: set[torch.fx.Node]) -> set[torch.fx.Node]:
    """The nodes and what the pass-through ops among them were applied to."""
    found = set()
    for node in nodes:
        while isinstance(node, torch.fx.Node) and node not in found:
            found.add(node)
            node = node.args[0] if node.target in PASS_THROUGH else None
    return found
