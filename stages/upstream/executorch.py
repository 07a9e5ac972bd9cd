"""executorch 1.5.1 (with torch 2.13.0): quantizer, kernel and lowering bugs met on real models."""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import shutil
from pathlib import Path
from typing import Callable, Iterator

import torch


def restore_integer_scalars(model: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Undo XNNPACKQuantizer's float constants on integer arithmetic.

    `XNNPACKQuantizer.transform_for_annotation` calls `_convert_scalars_to_attrs`
    (backends/xnnpack/quantizer/xnnpack_quantizer_utils.py:1163,
    `float_tensor = torch.tensor(float(args[i]))`), which turns every scalar operand of
    aten.add/mul into a float32 constant, integer index arithmetic included: `arange(n) + 1`
    then becomes float and indexing with it raises "tensors used as indices must be long, int,
    byte or bool tensors" (transformers' attention masks and position ids). Fixed upstream after
    1.5.1. Each such constant feeding an add/mul whose result is an integer tensor gets that
    integer dtype back.
    """
    for node in model.graph.nodes:
        value = node.meta.get("val")
        if (node.target not in (torch.ops.aten.add.Tensor, torch.ops.aten.mul.Tensor)
                or not isinstance(value, torch.Tensor) or value.dtype.is_floating_point):
            continue
        for arg in node.args:
            if not (isinstance(arg, torch.fx.Node) and arg.op == "get_attr"):
                continue
            constant = getattr(model, arg.target)
            if constant.ndim == 0 and constant.dtype.is_floating_point and float(constant).is_integer():
                fixed = torch.tensor(int(constant), dtype=value.dtype)
                setattr(model, arg.target, fixed)
                arg.meta["val"] = value.fake_mode.from_tensor(fixed, static_shapes=True)
    model.recompile()
    return model


# The optimized CPU kernel of native_layer_norm misreads float16 rows of 256 elements or more:
# kernels/optimized/cpu/moments_utils.h, `UpdateMomentsVec`, loads `Vectorized<float>` from the
# `const Half*` row (`Vec::loadu(X_ptr + j * Vec::size())`), so the mean and variance are garbage
# (max abs 270 on a 256-wide LayerNorm, measured). XNNPACK never takes LayerNorm, so every fp16
# program hits that kernel: these operators run in float32 inside an fp16 program.
FP16_UNSAFE_OPS = (torch.ops.aten.layer_norm.default, torch.ops.aten.native_layer_norm.default)


@contextlib.contextmanager
def conv_backends_off() -> Iterator[None]:
    """Lower with PyTorch's CPU convolution backends (mkldnn, nnpack) switched off.

    ExecuTorch's passes re-run every operator on fake tensors (exir/pass_base.py:587, `_fx`)
    outside torch.export's `_ignore_backend_decomps`; for a convolution the fake kernel asks
    `torch._C._select_conv_backend` (torch/_subclasses/fake_impls.py:1811), whose mkldnn/nnpack
    choice compares the symbolic batch with 16 and so narrows a dynamic batch to [2, 15]: the
    .pte then plans memory for 15 rows, not the spec's max. torch.export switches the same
    backends off while it traces; we do it while lowering.
    """
    with torch.backends.mkldnn.flags(enabled=False), torch.backends.nnpack.flags(enabled=False):
        yield


@contextlib.contextmanager
def pattern_graphs_when_matchable() -> Iterator[None]:
    """Lower without building XNNPACK's pattern graphs for a graph they cannot match.

    executorch 1.5.1: two of XNNPACK's passes match every program against graphs they make by
    exporting and lowering small modules (backends/xnnpack/_passes/convert_to_sdpa.py:102,
    `sdpa.get_graphs`; convert_to_upsample_bilinear2d.py:55, `bilinear_2d.get_graphs_dict`):
    2-4 s in each process that lowers, for any model. Every SDPA pattern has an
    aten._softmax node and every bilinear one an aten.upsample_bilinear2d.vec node
    (tests/test_upstream.py checks both), and the matcher pairs nodes of equal targets: a
    graph without that operator matches none. For one, each pass does here what it does when
    nothing matches (recompile, then its ExportPass retrace); otherwise its own `call`.
    """
    from executorch.backends.xnnpack._passes.convert_to_sdpa import ConvertToSDPAPass
    from executorch.backends.xnnpack._passes.convert_to_upsample_bilinear2d import ConvertToUpsampleBilinear2d
    from executorch.exir.dialects._ops import ops as exir_ops
    from torch.fx.passes.infra.pass_base import PassResult

    needed = {ConvertToSDPAPass: exir_ops.edge.aten._softmax.default,
              ConvertToUpsampleBilinear2d: exir_ops.edge.aten.upsample_bilinear2d.vec}
    originals = {cls: cls.call for cls in needed}

    def guarded(cls):
        def call(self, graph_module):
            if any(node.op == "call_function" and node.target == needed[cls] for node in graph_module.graph.nodes):
                return originals[cls](self, graph_module)
            graph_module.recompile()
            return PassResult(super(cls, self).call(graph_module).graph_module, True)
        return call

    for cls in needed:
        cls.call = guarded(cls)
    try:
        yield
    finally:
        for cls, call in originals.items():
            cls.call = call


# XNNPACKQuantizer's conv + batch-norm annotators, by name, and the operators every one of their
# patterns holds: a batch norm and one of the convolutions (tests/test_upstream.py checks)
CONV_BN_PATTERN_NEEDS = {
    **dict.fromkeys(("conv_bn", "conv_bn_relu"), (torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default)),
    **dict.fromkeys(("conv_transpose_bn", "conv_transpose_bn_relu"),
                    (torch.ops.aten.conv_transpose1d.default, torch.ops.aten.conv_transpose2d.input)),
}


@contextlib.contextmanager
def conv_bn_patterns_when_matchable() -> Iterator[None]:
    """Annotate for PT2E without tracing XNNPACKQuantizer's conv + batch-norm patterns for a
    graph they cannot match.

    executorch 1.5.1: for static quantization XNNPACKQuantizer runs its QAT-only conv-bn
    annotators too (backends/xnnpack/quantizer/xnnpack_quantizer.py:416, `elif not
    ...is_dynamic`), and each traces its patterns with a strict torch.export
    (xnnpack_quantizer_utils.py:571, `_get_aten_graph_module_for_pattern`): twelve traces, 1.5-2 s
    in each process that quantizes, for any model. Every pattern has an aten.batch_norm node and
    a convolution of CONV_BN_PATTERN_NEEDS, and the matcher pairs nodes of equal targets: a graph
    without both matches none. For one, each annotator does here what it does when nothing
    matches (dead code removed, no partitions); otherwise its own work.
    """
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer_utils import OP_TO_ANNOTATOR

    originals = {name: OP_TO_ANNOTATOR[name] for name in CONV_BN_PATTERN_NEEDS}

    def guarded(name):
        def annotate(gm, quantization_config, filter_fn=None):
            targets = {node.target for node in gm.graph.nodes if node.op == "call_function"}
            if torch.ops.aten.batch_norm.default in targets and targets & set(CONV_BN_PATTERN_NEEDS[name]):
                return originals[name](gm, quantization_config, filter_fn)
            gm.graph.eliminate_dead_code()
            gm.recompile()
            return []
        return annotate

    OP_TO_ANNOTATOR.update({name: guarded(name) for name in originals})
    try:
        yield
    finally:
        OP_TO_ANNOTATOR.update(originals)


FILE_BACKED_MIN_BYTES = 1 << 20  # smaller constants stay in memory: a file each would cost more


@contextlib.contextmanager
def file_backed_constants(folder: Path) -> Iterator[None]:
    """Lower with the XNNPACK delegate's constants kept in files under `folder`, not in memory.

    executorch 1.5.1: XNNPACK's NodeVisitor serializes every weight as `bytes(array)` into its
    NamedDataStore (backends/xnnpack/operators/node_visitor.py:646), which keeps that copy until
    the .pte is written: while `to_edge_transform_and_lower` runs, the source program's weights
    and the delegate's copy of all of them are held together (at 1B parameters 0.6% over 3x the
    weights). The store also takes FileBackedData (exir/_serialize/_cord.py), written to the
    .pte by a chunked copy: each blob it is given here goes to a file at once and the store
    keeps the file, so only the one weight being serialized is in memory twice. `folder` is
    removed on exit; the .pte must be written inside the block.
    """
    from executorch.exir._serialize._cord import FileBackedData
    from executorch.exir._serialize._named_data_store import NamedDataStore

    original = NamedDataStore.add_named_data
    folder.mkdir(parents=True, exist_ok=True)
    count = itertools.count()

    def add_named_data(self, key, data, *args, **kwargs):
        if isinstance(data, bytes) and len(data) >= FILE_BACKED_MIN_BYTES:
            path = folder / f"{next(count)}.bin"
            path.write_bytes(data)
            data = FileBackedData(str(path), cleanup=True, sha256=hashlib.sha256(data).digest())
        return original(self, key, data, *args, **kwargs)

    NamedDataStore.add_named_data = add_named_data
    try:
        yield
    finally:
        NamedDataStore.add_named_data = original
        shutil.rmtree(folder, ignore_errors=True)


def edge_compile_config(program: torch.export.ExportedProgram):
    """The EdgeCompileConfig to lower `program` with (None: ExecuTorch's default).

    The edge IR validator pins a dynamic dim of an operator that returns a tensor list as its
    only result (aten.split_with_sizes in a GRU's decomposition):
    exir/verification/arg_validator.py:104 iterates
    that list as if it were the returns, and line 129 then takes len() of its first tensor,
    guarding the symbolic batch to the traced size (2): the .pte plans memory for 2 rows and a
    larger batch fails in the runtime. Such programs lower without the IR validity check, the
    switch ExecuTorch itself names (`_check_ir_validity`); verify still runs the artifact.
    """
    from executorch.exir import EdgeCompileConfig

    graph = program.graph
    dynamic = any(isinstance(node.meta.get("val"), torch.Tensor)
                  and any(not isinstance(d, int) for d in node.meta["val"].shape)
                  for node in graph.nodes if node.op == "placeholder")
    list_only = torch.ListType.ofTensors()
    pinned = any(node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
                 and (node.target._schema.name in RECURRENT or len(node.target._schema.returns) == 1
                      and node.target._schema.returns[0].type == list_only)
                 for node in graph.nodes)
    return EdgeCompileConfig(_check_ir_validity=False) if dynamic and pinned else None


# recurrent operators decompose into list-returning ones (a GRU's gates: split_with_sizes) when
# the program becomes edge IR
RECURRENT = {"aten::gru", "aten::lstm", "aten::rnn_tanh", "aten::rnn_relu"}


def xnnpack_partitioner(left_out: Callable[[torch.fx.Node], bool] | None = None):
    """ExecuTorch's XnnpackPartitioner, refusing what its delegate then fails on (a PReLU that
    `prelu_in_four_dims` cannot make 4-D), and the nodes `left_out` names: those stay outside
    the delegate, on ExecuTorch's portable kernels (decomposed where the partitioner would have
    kept them whole)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    partitioner = XnnpackPartitioner()
    for name, config in partitioner.target_partitioner_configs.items():
        def check(node, program, inner=config.check_constraints, prelu=name == "prelu.default") -> bool:
            if prelu and _four_dims(node.args[0]) is None:
                return False
            return not (left_out and left_out(node)) and inner(node, program)
        config.check_constraints = check
    return partitioner


def prelu_in_four_dims(graph_module: torch.fx.GraphModule):
    """A transform pass (edge dialect): every PReLU of a 2-D or 3-D input runs on a 4-D view of it.

    XNNPACK takes a PReLU of any rank: `PreluConfig.check_constraints`
    (backends/xnnpack/partition/config/node_configs.py:117) checks only its weight. Its delegate's
    `ChannelsLastTaggedReshapePass` then lists prelu among the ops that need an NHWC input
    (backends/xnnpack/_passes/channels_last_tagged_reshape_pass.py:67), which `input_to_nhwc`
    (line 397) can make only of a 4-D tensor: "Attempting to convert non-NHWC compatible node
    to NHWC" (a PReLU after a Linear: MTCNN's face detectors, many audio heads). Unchanged
    upstream as of 2026-08. (N, C) and (N, C, L) inputs are viewed as (N, C, L, 1): the same
    per-channel PReLU, on XNNPACK's own kernel (tests/test_upstream.py)."""
    from executorch.exir.dialects._ops import ops as exir_ops
    from torch.fx.passes.infra.pass_base import PassResult

    graph, view = graph_module.graph, exir_ops.edge.aten.view_copy.default
    modified = False
    for node in [n for n in graph.nodes if n.target == exir_ops.edge.aten.prelu.default]:
        source, weight = node.args
        four = _four_dims(source)
        if four is None or _rank(source) == 4:
            continue
        shape = list(source.meta["val"].shape)
        with graph.inserting_before(node):
            viewed = graph.call_function(view, (source, four))
        with graph.inserting_after(node):
            back = graph.call_function(view, (node, [-1, *shape[1:]]))
        node.replace_all_uses_with(back, delete_user_cb=lambda user: user is not back)
        node.args = (viewed, weight)
        for new in (viewed, back):
            new.meta.update({k: v for k, v in node.meta.items() if k not in ("val", "tensor_meta")})
        viewed.meta["val"] = source.meta["val"].view(four)
        node.meta["val"] = torch.ops.aten.prelu.default(viewed.meta["val"], weight.meta["val"])
        back.meta["val"] = node.meta["val"].view([-1, *shape[1:]])
        modified = True
    if modified:
        graph.lint()
        graph_module.recompile()
    return PassResult(graph_module, modified)


def _four_dims(node) -> list[int] | None:
    """The 4-D shape a PReLU input is run at (its own if 4-D); None if its trailing dims are
    not all known (a dynamic channel or length cannot be viewed statically)."""
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    if not isinstance(value, torch.Tensor) or value.dim() not in (2, 3, 4):
        return None
    if value.dim() == 4:
        return list(value.shape)
    rest = list(value.shape[1:])
    if not all(isinstance(d, int) for d in rest):
        return None
    return [-1, *rest, *[1] * (4 - value.dim())]


def _rank(node) -> int | None:
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return value.dim() if isinstance(value, torch.Tensor) else None


def write_bundle(bundled_program, path) -> None:
    """ExecuTorch's `serialize_from_bundled_program_to_flatbuffer`, written to path, holding
    the program twice at most (the same bytes: tests/test_upstream.py).

    executorch 1.5.1 (devtools/bundled_program/serialize/__init__.py) holds it about 5 times:
    `_bundled_program_schema_to_flatbuffer` starts from `flatbuffers.Builder()` (1 KiB), which
    doubles and copies as the program goes in, and returns `bytes(builder.Output())` (two more
    copies); `_create_aligned_byte_vector` (exir/_serialize/_flatbuffer_program.py) assigns the
    program into a bytearray slice, which copies any source that is not a bytearray first.
    Here: one buffer sized for it, the program copied in through a memoryview, the buffer
    written to the file without a copy (2.1 GB -> about 0.8 GB for a 385 MB program)."""
    from unittest import mock

    import flatbuffers
    from executorch.devtools.bundled_program import serialize

    def byte_vector(builder, data: bytes, alignment: int) -> int:
        builder.StartVector(1, len(data), alignment)
        builder.head = builder.Head() - len(data)
        memoryview(builder.Bytes)[builder.Head():builder.Head() + len(data)] = data
        return builder.EndVector()

    schema = bundled_program.serialize_to_schema()
    serialize._install_fast_packers()
    flat = serialize._convert_bundled_program(schema)
    cases = sum(len(getattr(value.val, "data", None) or b"") for suite in schema.method_test_suites
                for case in suite.test_cases for value in (*case.inputs, *case.expected_outputs))
    builder = flatbuffers.Builder(len(flat.program) + 2 * cases + 2**20)
    with mock.patch.object(serialize, "_create_aligned_byte_vector", byte_vector):
        root = flat.Pack(builder)
    builder.Finish(root, file_identifier=serialize._bundled_program_file_identifier())
    with open(path, "wb") as out:
        out.write(memoryview(builder.Bytes)[builder.Head():])
