"""PT2E quantization of an ExportedProgram with XNNPACKQuantizer, and the project's corrections
to it (the state an app carries stays float; integer scalars stay integers)."""
from __future__ import annotations

from typing import Any

import torch
from torchao.quantization.pt2e.quantizer import Quantizer  # executorch imports torchao anyway

from ..support.model_builder import as_step
from ..support.state_io import state_nodes
from ..support.streaming import carry
from ..upstream.executorch import conv_bn_patterns_when_matchable, restore_integer_scalars
from . import Job, calibration_batches
from .fx_graph import within


def quantized(program: torch.export.ExportedProgram, job: Job, dynamic: bool) -> torch.nn.Module:
    """The program through PT2E with XNNPACKQuantizer (symmetric int8), calibrated on
    calibrate's batches with the part's state carried; keep_float's modules stay float."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer, get_symmetric_quantization_config)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    keep = list(job.quantize.keep_float)
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(
        is_per_channel=job.quantize.per_channel, is_dynamic=dynamic))
    prepared = prepare_pt2e(program.module(), _Guarded(quantizer, job.io, keep))
    initial = {name: prepared.get_buffer(name).clone() for name in job.io["internal_state"]}
    # in order, the state carried: calibrated on what a stream really sees
    carry(as_step(prepared, job.io["inputs"]), job.io, calibration_batches(job)[: 1 if dynamic else None])
    for name, value in initial.items():  # calibration moved the internal state on: reset it
        prepared.get_buffer(name).copy_(value)
    return convert_pt2e(prepared)


class _Guarded(Quantizer):
    """The inner quantizer with corrections: integer scalars stay integers (an upstream bug,
    stages/upstream/executorch.py), and the nodes that read or write the state, and those of the
    modules kept float, lose their annotations (the state is carried in float, never quantized)."""

    def __init__(self, inner: Quantizer, io: dict[str, Any], keep: list[str]):
        super().__init__()
        self.inner, self.io, self.keep = inner, io, keep

    def transform_for_annotation(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        return restore_integer_scalars(self.inner.transform_for_annotation(model))

    def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        with conv_bn_patterns_when_matchable():  # an upstream cost, not a fix
            model = self.inner.annotate(model)
        kept = {node for node in model.graph.nodes if within(node, self.keep)}
        removed = {node: node.meta.pop(ANNOTATION) for node in state_nodes(model.graph, self.io) | kept
                   if ANNOTATION in node.meta}
        _unshare_from(removed, model.graph)
        return model

    def validate(self, model: torch.fx.GraphModule) -> None:
        self.inner.validate(model)


ANNOTATION = "quantization_annotation"


def _unshare_from(removed: dict, graph: torch.fx.Graph) -> None:
    """Annotations that share an observer with a node whose annotation was removed (a ReLU6
    sharing its conv's output scale) get the spec that observer had: a SharedQuantizationSpec
    pointing at an unannotated node fails prepare_pt2e with `KeyError: <node>`."""
    from torchao.quantization.pt2e.quantizer import SharedQuantizationSpec

    def annotation(node):
        return removed.get(node) or node.meta.get(ANNOTATION)

    def resolved(qspec):
        while isinstance(qspec, SharedQuantizationSpec):
            target = qspec.edge_or_node
            node = target if isinstance(target, torch.fx.Node) else target[1]
            if node not in removed:
                return qspec  # still shares with an annotated node: fine as it is
            found = annotation(node)
            qspec = found.output_qspec if target is node else found.input_qspec_map.get(target[0])
        return qspec

    for node in graph.nodes:
        found = node.meta.get(ANNOTATION)
        if found is None:
            continue
        found.output_qspec = resolved(found.output_qspec)
        found.input_qspec_map = {arg: resolved(spec) for arg, spec in found.input_qspec_map.items()}
