"""A processing step's ONNX written as ONNX text, as an onnxruntime-extensions Step, so that its
PrePostProcessor joins our steps and its own into one graph."""
from __future__ import annotations

from typing import Callable

import onnx
from onnxruntime_extensions.tools.pre_post_processing.step import Step as ExtensionsStep

# build(step, [(input type, input shape)]) -> (output declarations, body, initializers)
Body = Callable[["TextStep", list[tuple[str, str]]], tuple[str, str, list[onnx.TensorProto]]]


class TextStep(ExtensionsStep):
    """A step whose graph `build` writes in ONNX's text syntax (onnx.parser); its inputs and
    outputs are named self.input_names / self.output_names, as the PrePostProcessor connects them."""

    def __init__(self, name: str, inputs: list[str], outputs: list[str], build: Body):
        super().__init__(list(inputs), list(outputs), name)
        self._build = build

    def _create_graph_for_step(self, graph: onnx.GraphProto, onnx_opset: int) -> onnx.GraphProto:
        types = [self._get_input_type_and_shape_strs(graph, i) for i in range(len(self.input_names))]
        outputs, body, initializers = self._build(self, types)
        inputs = ", ".join(f"{t}[{s}] {n}" for (t, s), n in zip(types, self.input_names))
        result = onnx.parser.parse_graph(f"{self.name.lower()} ({inputs}) => ({outputs}) {{\n{body}\n}}")
        result.initializer.extend(initializers)
        return result
