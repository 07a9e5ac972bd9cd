"""torchao's `quantize_` on the weights of an exported program's graph.

`quantize_` swaps the weight of an nn.Linear / nn.Embedding for a tensor subclass
(IntxUnpackedToInt8Tensor) whose F.linear / F.embedding run the quantized arithmetic; torch.export
then traces that into torchao's quantize/dequantize ops, the patterns XNNPACK (8-bit dynamic
activations, 4-bit weights) and ExecuTorch's quantized embedding kernels lower. An exported graph
has no such modules, only `aten.linear` / `aten.embedding` calls on its attributes: each weight is
given to `quantize_` on a stand-in module of its shape, put back as the subclass, and its call
retargeted to the torch.nn.functional op the subclass implements. (Calling `aten.linear.default`
on the subclass fails: that op is CompositeImplicitAutograd, it decomposes into `aten.t` before the
subclass sees it, and IntxUnpackedToInt8Tensor implements no `aten.t`.)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from .fx_graph import _attribute, _set_attribute, module_paths, within
from .int4 import Int4Options


@dataclass
class Quantized:
    """What was quantized, by module path; and what stayed float, and why."""

    linear: list[str] = field(default_factory=list)
    embeddings: list[str] = field(default_factory=list)
    narrow: list[str] = field(default_factory=list)  # input width not a multiple of the group size


def int4_weights(module: GraphModule, options: Int4Options, keep_float: list[str]) -> Quantized:
    """Linear weights to 4-bit groups with int8 dynamic activations (torchao's
    Int8DynamicActivationIntxWeightConfig, XNNPACK's kernels) and, where options.embeddings, the
    embedding tables to 4-bit groups (IntxWeightOnlyConfig); keep_float's modules stay float."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    groups = PerGroup(options.group_size)
    return _quantized_weights(
        module, keep_float, options.fits,
        Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=groups),
        IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=groups) if options.embeddings else None)


def int8_tables(module: GraphModule, keep_float: list[str]) -> Quantized:
    """The embedding tables to int8, one scale a row (IntxWeightOnlyConfig, ExecuTorch's
    embedding_byte kernel): XNNPACKQuantizer has no embedding pattern and leaves them float,
    most of a language model's bytes."""
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis

    return _quantized_weights(module, keep_float, lambda width: True, None,
                              IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)))


def _quantized_weights(module: GraphModule, keep_float: list[str], fits, linear, table) -> Quantized:
    """Each weight of an aten.linear (with the `linear` config) or aten.embedding (`table`) whose
    every reader is one of those, outside keep_float, quantized; a weight shared with another
    reader (a tied lm_head under PT2E's own quantization) stays as it is."""
    configs = {LINEAR: linear, EMBEDDING: table}
    done = Quantized()
    readers: dict[str, list[Node]] = {}
    for node in module.graph.nodes:
        weight = _weight(node)
        if weight is not None and configs[node.target] is not None and not within(node, keep_float):
            readers.setdefault(weight.target, []).append(node)
    for target, nodes in readers.items():
        attribute = next(n for n in module.graph.nodes if n.op == "get_attr" and n.target == target)
        if set(attribute.users) != set(nodes):
            continue
        value = _attribute(module, target)
        where = [".".join(module_paths(node)[-1:]) or target for node in nodes]
        if not fits(value.shape[1]):
            done.narrow += where
            continue
        first = next((n for n in nodes if n.target == LINEAR), nodes[0])  # a tied table computes too
        kind = torch.nn.Linear if first.target == LINEAR else torch.nn.Embedding
        _set_attribute(module, target, _quantized(kind, value, configs[first.target]))
        for node, path in zip(nodes, where):
            if node.target == LINEAR:
                node.target = torch.nn.functional.linear
                done.linear.append(path)
            else:  # aten.embedding(weight, indices, padding_idx, ...) -> F.embedding(indices, weight):
                # the arguments after indices only shape gradients, never the forward's values
                node.target, node.args = torch.nn.functional.embedding, (node.args[1], node.args[0])
                done.embeddings.append(path)
    module.recompile()
    return done


LINEAR, EMBEDDING = torch.ops.aten.linear.default, torch.ops.aten.embedding.default


def _weight(node: Node) -> Node | None:
    """The weight attribute an aten.linear / aten.embedding reads."""
    if node.op != "call_function" or node.target not in (LINEAR, EMBEDDING):
        return None
    weight = node.args[1] if node.target == LINEAR else node.args[0]
    return weight if isinstance(weight, Node) and weight.op == "get_attr" else None


def _quantized(kind: type, weight: torch.Tensor, config) -> torch.Tensor:
    """The weight as quantize_ leaves it on a stand-in module of its kind."""
    from torchao.quantization import quantize_

    stand_in = kind(weight.shape[1], weight.shape[0], bias=False) if kind is torch.nn.Linear \
        else kind(weight.shape[0], weight.shape[1])
    stand_in.weight = torch.nn.Parameter(weight.detach(), requires_grad=False)
    quantize_(stand_in, config, filter_fn=lambda *_: True)
    return stand_in.weight.detach()
