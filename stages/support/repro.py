"""A failure an upstream maintainer can run: the smallest module of the part that still fails,
exported alone with the inputs it received, and a script that calls the library on it.

`lowering_repro` takes the program a lowering step failed on and the module its error names,
cuts that module's nodes out of the graph (its inputs captured by running the program on the
part's example inputs), and checks that the cut fails the same way; if not, the parent module,
up to the whole part. The folder holds module.pt2, inputs.pt, repro.py (libraries only: torch
and the one being reported) and README.md (error, versions, host CPU, how to run).
"""
from __future__ import annotations

import json
import operator
import textwrap
from pathlib import Path
from typing import Any, Mapping

import torch
from torch.fx import Graph, GraphModule, Node

from pipelines.errors import PipelineError, first_line

from ..formats.fx_graph import Replay, module_paths
from .model_builder import example_inputs

SCRIPT = '''"""{title}

Run: python repro.py    (in this folder; exit 1 with the error while the bug is there, 0 once fixed)
"""
import sys

import torch

program = torch.export.load("module.pt2")
inputs = torch.load("inputs.pt", weights_only=True)
program.module()(*inputs)  # the module runs eagerly on the inputs it received
try:
{call}
except Exception as exc:
    cause = exc.__cause__ or exc
    print(f"reproduced: {{type(cause).__name__}}: {{cause}}", file=sys.stderr)
    sys.exit(1)
print("not reproduced: this version lowers the module")
'''


def failure_repro(folder: Path, program: torch.export.ExportedProgram, specs: list[Mapping[str, Any]],
                  failure: PipelineError, step: str, packages: tuple[str, ...], call: str) -> str:
    """The repro of a lowering failure in folder/<its module>, said in a few words for a warning
    ("repro/blocks.0 (blocks.0.act, 3 operators)")."""
    target = folder / (failure.module or "part")
    written = lowering_repro(target, program, specs, failure.module, failure.message.split(": ", 1)[-1],
                             step, packages, call)
    return f"repro/{target.name} ({written['module'] or 'the whole part'}, {written['nodes']} operators)"


def lowering_repro(directory: Path, program: torch.export.ExportedProgram, specs: list[Mapping[str, Any]],
                   module: str | None, error: str, step: str, packages: tuple[str, ...], call: str
                   ) -> dict[str, Any]:
    """Write the repro of `error` (raised by `step` on `program`) into `directory`; `call` is the
    script's library call on `program` (and `inputs`), run here too to check that a cut still
    fails alike; `packages` the libraries it needs. Returns what was written."""
    from pipelines.versions import host_cpu, library_versions

    graph_module = program.module()
    values = _captured(graph_module, example_inputs(specs))
    chosen, cut, inputs = None, program, example_inputs(specs)
    for candidate in _enclosing(module):
        sub, sub_inputs = _cut(graph_module, candidate, values)
        if sub is not None and _fails_alike(call, sub, sub_inputs, error):
            chosen, cut, inputs = candidate, sub, sub_inputs
            break
    directory.mkdir(parents=True, exist_ok=True)
    torch.export.save(cut, directory / "module.pt2")
    torch.save(tuple(t.detach().clone() for t in inputs), directory / "inputs.pt")
    what = f"module {chosen}" if chosen else "the whole part"
    title = f"{step} fails on {what}: {error}"
    (directory / "repro.py").write_text(SCRIPT.format(title=title, call=textwrap.indent(call, "    ")))
    versions = {k: v for k, v in library_versions().items() if k in packages}
    (directory / "README.md").write_text(_readme(title, what, cut, inputs, versions, host_cpu(), _custom_ops(cut)))
    (directory / "versions.json").write_text(json.dumps({"versions": versions, "cpu": host_cpu()}, indent=1))
    return {"module": chosen, "nodes": _count(cut), "folder": directory.name}


def _enclosing(module: str | None) -> list[str]:
    """The module, then each parent up to (not including) the whole part: blocks.0.act, blocks.0, blocks."""
    if not module:
        return []
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def _captured(graph_module: GraphModule, inputs: tuple) -> dict[Node, Any]:
    """Every node's value on the example inputs."""
    values: dict[Node, Any] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node):
            values[node] = result = super().run_node(node)
            return result

    with torch.no_grad():
        Recorder(graph_module).run(*inputs)
    return values


def _cut(graph_module: GraphModule, module: str, values: dict[Node, Any]
         ) -> tuple[torch.export.ExportedProgram | None, tuple]:
    """The module's nodes as a program of their own: what flows in from outside becomes its
    inputs (their captured values), what flows out its outputs. None if nothing computes there."""
    inside = [n for n in graph_module.graph.nodes if n.op == "call_function" and module in module_paths(n)]
    if not inside:
        return None, ()
    members = set(inside)
    graph, copied, feeds = Graph(), {}, []

    def outer(value: Node) -> Node:
        if value in copied:
            return copied[value]
        if value.op == "get_attr":
            copied[value] = graph.get_attr(value.target)
        elif isinstance(values.get(value), torch.Tensor):
            copied[value] = graph.placeholder(f"in_{len(feeds)}")
            feeds.append(values[value])
        else:  # a Python value (a size): baked in
            return values.get(value)
        return copied[value]

    for node in inside:
        for source in node.all_input_nodes:
            if source not in members:
                outer(source)
        copied[node] = graph.node_copy(node, lambda v: copied[v] if v in copied else outer(v))
    leaving = [n for n in inside if isinstance(values.get(n), torch.Tensor)
               and any(user not in members for user in n.users)]
    leaving = leaving or [inside[-1]]
    graph.output(tuple(copied[n] for n in leaving))
    sub = GraphModule(graph_module, graph)
    try:
        with torch.no_grad():
            program = torch.export.export(Replay(sub), tuple(feeds), strict=False)
    except Exception:  # some cuts do not stand alone (a getitem of a multi-output op): try the parent
        return None, ()
    return program, tuple(feeds)


def _fails_alike(call: str, program: torch.export.ExportedProgram, inputs: tuple, error: str) -> bool:
    """Whether the call fails on the cut with the error it raised on the whole (its first words)."""
    try:
        exec(call, {"program": program, "inputs": inputs, "torch": torch})
    except Exception as exc:
        while exc.__cause__ is not None:
            exc = exc.__cause__
        return first_line(exc)[:80] in error
    return False


def _count(program: torch.export.ExportedProgram) -> int:
    return sum(n.op == "call_function" and n.target is not operator.getitem for n in program.graph.nodes)


LIBRARY_OPS = {"aten", "prims", "quantized_decomposed", "torchao", "higher_order"}


def _custom_ops(program: torch.export.ExportedProgram) -> list[str]:
    """Operators of the model's own libraries (torch.library): the script needs them registered."""
    return sorted({str(n.target) for n in program.graph.nodes if n.op == "call_function"
                   and hasattr(n.target, "namespace") and n.target.namespace not in LIBRARY_OPS})


def _readme(title: str, what: str, program, inputs, versions: dict, cpu: dict, custom: list[str]) -> str:
    shapes = ", ".join(f"{list(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in inputs)
    pins = "\n".join(f"    {name}=={version}" for name, version in sorted(versions.items()))
    needs = (f"It calls the model's own operators {', '.join(custom)}: import the module that defines them "
             "(torch.library) at the top of repro.py.\n\n") if custom else ""
    return (f"# {title}\n\n"
            f"The smallest part of the model that still fails: {what}, {_count(program)} operators, "
            f"exported alone (module.pt2) with the inputs it received (inputs.pt: {shapes}).\n\n{needs}"
            f"Reproduce with the libraries alone:\n\n    pip install {' '.join(f'{n}=={v}' for n, v in sorted(versions.items()))}\n"
            f"    python repro.py\n\nVersions:\n\n{pins}\n\nHost CPU: {cpu['model']} ({cpu['machine']}; "
            f"{', '.join(k for k, v in cpu.items() if v is True) or 'no listed features'})\n")
