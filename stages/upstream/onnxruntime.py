"""onnxruntime 1.31.1: what its static quantizer, its x86 int8 kernels and its graph optimizers
need from us."""
from __future__ import annotations

from typing import Any, Iterable

X86_ISA = "x86_64"


def int8_weight_bits(isa: Iterable[str]) -> dict[str, Any]:
    """quantize_static arguments for where the artifact runs.

    x86 CPUs without VNNI (AVX2 or AVX-512 alone, e.g. AMD EPYC before Zen 4) multiply u8
    activations by s8 weights with vpmaddubsw, which adds two products into a saturating int16:
    2 * 255 * 127 = 64770 overflows 32767 and the fused QGemm/QLinearConv kernels clip (cosine
    0.96 on a 2-layer MLP, measured). VNNI (vpdpbusd) accumulates in int32 and does not. With
    7-bit weights (reduce_range: |w| <= 64) a pair stays <= 32640 on every x86 CPU, so the
    artifact computes the same numbers whether or not the CPU that runs it has VNNI. ARM (sdot)
    and WebAssembly (i32x4.dot_i16x8 on widened values) never saturate: full 8-bit weights there.
    """
    return {"reduce_range": X86_ISA in set(isa)}


def unquantizable_layer_norms(model) -> list[str]:
    """LayerNormalization nodes whose scale or bias has rank >= 2 (nn.LayerNorm([C, D])).

    quantize_static(per_channel=True) quantizes such a scale per channel, then
    qdq_quantizer.py:486 (`_adjust_weight_scale_for_int32_bias`) compares a whole bias row with
    a scalar, `if (bias_candidate_scale < bias_smallest_valid_scale) and ...`, and raises
    "The truth value of an array with more than one element is ambiguous". The CPU execution
    provider has no int8 LayerNorm kernel anyway: these nodes are left in float.
    """
    ranks = {tensor.name: len(tensor.dims) for tensor in model.graph.initializer}
    return [node.name for node in model.graph.node if node.op_type == "LayerNormalization"
            and any(ranks.get(name, 0) >= 2 for name in node.input[1:3])]


def unsafe_optimizers(model) -> list[str]:
    """Graph optimizers to switch off for this graph: onnxruntime 1.31.1's NchwcTransformer (on
    at ORT_ENABLE_ALL, x86) segfaults at session creation on float16 graphs whose
    Transpose(fp16) -> Cast -> MatMul -> Add -> Cast(fp16) chain has symbolic dims (a GRU or LSTM
    converted to fp16 with a dynamic batch). It only re-lays out fp32 convolutions, so an fp16
    graph loses nothing without it; io.json tells an app to create its session the same way."""
    float16 = 10
    tensors = [*model.graph.initializer]
    values = [*model.graph.input, *model.graph.output, *model.graph.value_info]
    casts = any(node.op_type == "Cast" and any(a.name == "to" and a.i == float16 for a in node.attribute)
                for node in model.graph.node)
    half = casts or any(t.data_type == float16 for t in tensors) or \
        any(v.type.tensor_type.elem_type == float16 for v in values)
    return ["NchwcTransformer"] if half else []


def unquantizable_average_pools(model) -> list[str]:
    """AveragePool nodes with ceil_mode=1: from ORT_ENABLE_EXTENDED on, onnxruntime 1.31.1 fuses
    their Q-DQ-AveragePool-Q-DQ group into QLinearAveragePool, which returns 0 where the window
    is larger than its input (transformers' EfficientNet pooler, nn.AvgPool2d(kernel,
    ceil_mode=True) on a 2x2 map: max abs 0.77 against 0.003 unfused). Left in float."""
    return [node.name for node in model.graph.node if node.op_type == "AveragePool"
            and any(a.name == "ceil_mode" and a.i == 1 for a in node.attribute)]


def restore_node_metadata(source, optimized) -> int:
    """Copy each node's metadata_props from the graph a session optimized to the graph it wrote;
    returns how many nodes got theirs back.

    onnxruntime 1.31.1 writes an optimized graph whose initializers go to an external file
    (`session.optimized_model_external_initializers_file_name`) through
    Graph::ToGraphProtoWithExternalInitializers, which drops every node's metadata_props; the
    in-memory path keeps them. The exporter's module paths live there, and quantize.keep_float
    and the diagnosis need them on big graphs as on small ones. Matched by node name; the nodes
    it makes of an ONNX function (HardSwish inlined into HardSigmoid and Mul, named "" both ways)
    by the value they compute, or else by the nodes that read theirs."""
    kept = {node.name: node.metadata_props for node in source.graph.node if node.name and node.metadata_props}
    by_output = {out: node.metadata_props for node in source.graph.node if node.metadata_props for out in node.output}
    restored = 0
    for node in optimized.graph.node:
        found = kept.get(node.name) or next((by_output[out] for out in node.output if out in by_output), None)
        if not node.metadata_props and found:
            node.metadata_props.extend(found)
            restored += 1
    readers: dict[str, list] = {}
    for node in optimized.graph.node:
        for value in node.input:
            readers.setdefault(value, []).append(node)
    for node in reversed(optimized.graph.node):  # consumers first: a chain inherits back to front
        users = [user for out in node.output for user in readers.get(out, [])]
        props = {tuple((p.key, p.value) for p in user.metadata_props) for user in users}
        if not node.metadata_props and len(props) == 1 and users[0].metadata_props:
            node.metadata_props.extend(users[0].metadata_props)
            restored += 1
    return restored


def float16_without_weights(model, **options):
    """onnxruntime.transformers.float16.convert_float_to_float16 on a graph whose weights were
    left out (they are converted apart, one at a time: stages/formats/onnx.py).

    The converter only retypes an initializer that has no data, but then builds its value_info
    with `make_value_info_from_tensor`, which decodes the whole tensor to learn its shape
    (`numpy_helper.to_array(tensor).shape`, onnxruntime/transformers/float16.py): on a weightless
    tensor that raises "cannot reshape array of size 0", and on a loaded one it costs a copy of
    every weight. The shape is the tensor's dims, which is what is used here instead."""
    from unittest import mock

    from onnx import helper
    from onnxruntime.transformers import float16

    def value_info(tensor):
        return helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))

    with mock.patch.object(float16, "make_value_info_from_tensor", value_info):
        return float16.convert_float_to_float16(model, **options)


def gemms_as_matmuls(model) -> int:
    """Each Gemm with a constant weight (the exporter's nn.Linear on 2-D inputs) rewritten as the
    MatMul + Add it computes, in place; returns how many.

    onnxruntime's MatMulNBitsQuantizer quantizes MatMul (and Gather) only:
    `DefaultWeightOnlyQuantConfig.op_types_to_quantize` defaults to {"MatMul"} and
    `DefaultWeightOnlyQuantizer` builds MatMulNBits from a MatMul's constant B alone
    (onnxruntime/quantization/matmul_nbits_quantizer.py); a Gemm is passed over, so a classifier
    head or any Linear on a (batch, features) input would stay float at int4. The MatMul keeps the
    Gemm's name and metadata (module paths), so keep_float still finds it.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    weights = {t.name: t for t in model.graph.initializer}
    nodes, rewritten = [], 0
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "Gemm" or node.input[1] not in weights or attrs.get("transA", 0) \
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(weights[node.input[1]])
        matrix = numpy_helper.from_array(np.ascontiguousarray(weight.T if attrs.get("transB", 0) else weight),
                                         f"{node.input[1]}_as_matmul")
        model.graph.initializer.append(matrix)
        product = f"{node.output[0]}_product" if len(node.input) > 2 and node.input[2] else node.output[0]
        matmul = helper.make_node("MatMul", [node.input[0], matrix.name], [product], name=node.name)
        matmul.metadata_props.extend(node.metadata_props)
        nodes.append(matmul)
        if product != node.output[0]:
            bias = helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_bias")
            bias.metadata_props.extend(node.metadata_props)
            nodes.append(bias)
        rewritten += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {name for node in model.graph.node for name in node.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return rewritten
