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
    Int8DynamicActivationIntxWeightConfig) and, where options.embeddings, the embedding tables to
    4-bit groups (IntxWeightOnlyConfig); the modules keep_float names stay float."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    groups = PerGroup(options.group_size)
    linear = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=groups)
    table = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=groups)
    done = Quantized()
    for node in list(module.graph.nodes):
        weight = _weight(node)
        if weight is None or within(node, keep_float) or (node.target == EMBEDDING and not options.embeddings):
            continue
        value = _attribute(module, weight.target)
        where = ".".join(module_paths(node)[-1:]) or weight.target
        if not options.fits(value.shape[1]):
            done.narrow.append(where)
            continue
        if node.target == LINEAR:
            _set_attribute(module, weight.target, _quantized(torch.nn.Linear, value, linear))
            node.target = torch.nn.functional.linear
            done.linear.append(where)
        else:  # aten.embedding(weight, indices, padding_idx, ...) -> F.embedding(indices, weight):
            # the arguments after indices only shape gradients, never the forward's values
            _set_attribute(module, weight.target, _quantized(torch.nn.Embedding, value, table))
            node.target, node.args = torch.nn.functional.embedding, (node.args[1], node.args[0])
            done.embeddings.append(where)
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
