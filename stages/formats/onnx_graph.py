"""Provenance and surgery on ONNX graphs made by torch.onnx's dynamo exporter.

The exporter records on each node the modules it came from (`pkg.torch.onnx.name_scopes`,
`pkg.torch.onnx.class_hierarchy`); onnxruntime's quantization and float16 tools keep that metadata
on the nodes they keep. It is stripped from the shipped .onnx only (lower), never from the
cached intermediate graphs, so quantize and diagnosis can name `blocks.0.norm`.
"""
from __future__ import annotations

import ast
from typing import Iterable

from ..support.model_builder import PART_PREFIX

SCOPES = "pkg.torch.onnx.name_scopes"
CLASSES = "pkg.torch.onnx.class_hierarchy"


def _metadata(node, key: str) -> list[str]:
    for prop in node.metadata_props:
        if prop.key == key:
            try:
                return [str(v) for v in ast.literal_eval(prop.value)]
            except (ValueError, SyntaxError):
                return []
    return []


def module_paths(node) -> list[str]:
    """The modules a node comes from, outermost first, as the user names them (`blocks.0.norm`)."""
    scopes = _metadata(node, SCOPES)[1:-1]  # [root, ...modules..., operator]
    return [s.removeprefix(PART_PREFIX) for s in scopes if s.startswith(PART_PREFIX)]


def module_types(node) -> dict[str, str]:
    """module path -> class name, for the modules a node comes from."""
    scopes, classes = _metadata(node, SCOPES)[1:-1], _metadata(node, CLASSES)[1:-1]
    return {s.removeprefix(PART_PREFIX): c.rsplit(".", 1)[-1] for s, c in zip(scopes, classes)
            if s.startswith(PART_PREFIX)}


def in_modules(node, modules: Iterable[str]) -> bool:
    """Whether the node comes from one of the modules (or from inside one)."""
    return bool(set(module_paths(node)) & set(modules))


def module_outputs(model) -> dict[str, str]:
    """Each module's output value, in the order the graph computes them; only modules whose nodes
    leave exactly one value (a module called twice, or returning a tuple, is left out)."""
    members: dict[str, set[int]] = {}
    for index, node in enumerate(model.graph.node):
        for path in module_paths(node):
            members.setdefault(path, set()).add(index)
    readers = _readers(model)
    found: dict[str, tuple[int, str]] = {}
    for path, nodes in members.items():
        leaving = [(index, name) for index in sorted(nodes) for name in model.graph.node[index].output
                   if name and readers.get(name, {-1}) - nodes]
        if len(leaving) == 1:
            found[path] = leaving[0]
    return {path: name for path, (_, name) in sorted(found.items(), key=lambda item: item[1][0])}


QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def _readers(model) -> dict[str, set[int]]:
    """The nodes that read each value, seen through the QuantizeLinear/DequantizeLinear pairs a
    quantizer inserts (they belong to no module); -1 stands for a graph output."""
    direct: dict[str, list[int]] = {}
    for index, node in enumerate(model.graph.node):
        for name in node.input:
            direct.setdefault(name, []).append(index)
    for value in model.graph.output:
        direct.setdefault(value.name, []).append(-1)

    def through(name: str, seen: frozenset = frozenset()) -> set[int]:
        found: set[int] = set()
        for index in direct.get(name, []):
            node = model.graph.node[index] if index >= 0 else None
            if node is not None and node.op_type in QDQ_OPS and index not in seen:
                found |= {r for out in node.output for r in through(out, seen | {index})}
            else:
                found.add(index)
        return found

    return {name: through(name) for name in direct}


def quantizer_of(model, value: str):
    """The QuantizeLinear node that is value's only consumer, if there is one."""
    users = [node for node in model.graph.node if value in node.input]
    return users[0] if len(users) == 1 and users[0].op_type == "QuantizeLinear" else None


def requantized(model, value: str) -> str:
    """The value as the next layer reads it: the output of the DequantizeLinear after its
    QuantizeLinear when the quantizer put one there, else the value itself."""
    quantize = quantizer_of(model, value)
    if quantize is not None:
        for node in model.graph.node:
            if node.op_type == "DequantizeLinear" and node.input[0] == quantize.output[0]:
                return node.output[0]
    return value


def with_outputs(model, values: list[str]):
    """The model returning `values` after its own outputs."""
    import onnx

    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(v) for v in values)
    return model


def prefix(model, value: str):
    """The part of the model that computes `value` and nothing after it, returning it. A value
    that is quantized ends at its QuantizeLinear followed by a fresh DequantizeLinear, the same
    shape the quantized model's last layer has, so the runtime fuses it as it ships."""
    import onnx

    nodes = list(model.graph.node)
    quantize = quantizer_of(model, value)
    if quantize is not None:
        value = value + "_probe"
        nodes.append(onnx.helper.make_node("DequantizeLinear", [quantize.output[0], *quantize.input[1:]],
                                           [value], name=value))
    producer = {name: node for node in nodes for name in node.output}
    needed, keep, todo = set(), set(), [value]
    while todo:
        name = todo.pop()
        if name in needed:
            continue
        needed.add(name)
        node = producer.get(name)
        if node is not None and id(node) not in keep:
            keep.add(id(node))
            todo.extend(i for i in node.input if i)
    graph = onnx.helper.make_graph(
        [node for node in nodes if id(node) in keep], model.graph.name,
        [v for v in model.graph.input if v.name in needed],
        [onnx.helper.make_empty_tensor_value_info(value)],
        [t for t in model.graph.initializer if t.name in needed])
    return onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


def unquantized_inputs(model, nodes: set[str], original):
    """Nodes kept in float also read their inputs in float: an activation that reaches them
    through a QuantizeLinear -> DequantizeLinear pair (the producer quantizes its output for its
    other consumers) is read before that pair instead. onnxruntime's quantizer folds a Relu or
    Clip into the QuantizeLinear after it ("removable activations"): one that `original` (the
    graph before quantization) has there is put back for the float reader."""
    import onnx

    producer = {name: node for node in model.graph.node for name in node.output}
    before = {name: node for node in original.graph.node for name in node.output}
    restored: dict[str, str] = {}
    for node in [n for n in model.graph.node if n.name in nodes]:
        for index, name in enumerate(node.input):
            dequantize = producer.get(name)
            quantize = producer.get(dequantize.input[0]) if dequantize is not None and \
                dequantize.op_type == "DequantizeLinear" else None
            if quantize is None or quantize.op_type != "QuantizeLinear":
                continue
            value = quantize.input[0]
            folded = before.get(value)
            if folded is not None and folded.op_type in ("Relu", "Clip") and \
                    producer.get(value, folded).op_type != folded.op_type:
                if value not in restored:
                    restored[value] = f"{value}_{folded.op_type.lower()}_float"
                    model.graph.node.append(onnx.helper.make_node(
                        folded.op_type, [value, *folded.input[1:]], [restored[value]],
                        name=restored[value]))
                value = restored[value]
            node.input[index] = value
    return _sorted(model)


def _sorted(model):
    """The graph's nodes in an order where every value is made before it is read."""
    made = {v.name for v in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    pending, ordered = list(model.graph.node), []
    while pending:
        ready = [n for n in pending if all(i in made for i in n.input)]
        if not ready:
            raise ValueError("the graph has a cycle or reads an undefined value")
        for node in ready:
            ordered.append(node)
            made.update(node.output)
        pending = [n for n in pending if all(n is not r for r in ready)]
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    return model


def folded_activations(quantized, original) -> dict[str, dict]:
    """Values whose Relu or Clip onnxruntime's quantizer folded into the QuantizeLinear after them
    (the graph keeps the value's name on the layer before it): name -> {range: [low, high] the
    next layer sees it clipped to, modules: the modules the activation belonged to}. For those
    modules the output is the raw value clipped so; for a module the activation followed from
    outside (a functional relu), the raw value is its output."""
    from onnx import numpy_helper

    constants = {t.name: float(numpy_helper.to_array(t)) for t in original.graph.initializer if not t.dims}
    constants.update({n.output[0]: float(numpy_helper.to_array(a.t)) for n in original.graph.node
                      if n.op_type == "Constant" for a in n.attribute if a.name == "value" and not a.t.dims})
    before = {name: node for node in original.graph.node for name in node.output}
    after = {name: node for node in quantized.graph.node for name in node.output}
    folded = {}
    for name, node in before.items():
        now = after.get(name)
        if node.op_type not in ("Relu", "Clip") or now is None or now.op_type == node.op_type:
            continue
        low = 0.0 if node.op_type == "Relu" else constants.get(node.input[1] if len(node.input) > 1 else "", float("-inf"))
        high = float("inf") if node.op_type == "Relu" else constants.get(node.input[2] if len(node.input) > 2 else "", float("inf"))
        folded[name] = {"range": [low, high], "modules": module_paths(node)}
    return folded
