"""Output steps: class scores to probabilities, the top class, the top k with their labels."""
from __future__ import annotations

import json

import torch
from torch import nn

from . import Step, register
from .graphs import TextStep


class _Softmax(nn.Module):
    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return torch.softmax(scores, dim=-1)


@register
class Softmax(Step):
    """scores -> probabilities over the last axis."""

    name = "softmax"

    def onnx(self) -> list:
        def build(step, types):
            (kind, shape), = types
            body = f"{step.output_names[0]} = Softmax <axis = -1> ({step.input_names[0]})"
            return f"float[{shape}] {step.output_names[0]}", body, []

        return [TextStep("Softmax", ["scores"], ["probabilities"], build)]

    def torch(self) -> nn.Module:
        return _Softmax()

    def outputs(self, fmt: str) -> list[str]:
        return ["probabilities"]


class _ArgMax(nn.Module):
    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return torch.argmax(scores, dim=-1)


@register
class ArgMax(Step):
    """scores [B, C] -> the top class [B] (int64)."""

    name = "argmax"

    def onnx(self) -> list:
        def build(step, types):
            (kind, shape), = types
            body = f"{step.output_names[0]} = ArgMax <axis = -1, keepdims = 0> ({step.input_names[0]})"
            return f"int64[{shape.split(',')[0]}] {step.output_names[0]}", body, []

        return [TextStep("ArgMax", ["scores"], ["top_class"], build)]

    def torch(self) -> nn.Module:
        return _ArgMax()

    def outputs(self, fmt: str) -> list[str]:
        return ["top_class"]


class _TopK(nn.Module):
    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, scores: torch.Tensor):
        values, indices = torch.topk(scores, self.k, dim=-1)
        return values, indices


@register
class TopK(Step):
    """scores [B, C] -> top_scores [B, k] and top_classes [B, k] (int64), highest first; with
    `labels` (one per class) also top_labels [B, k] (strings) in the .onnx (a Gather on the
    names). A .pte holds no strings: its app maps top_classes through labels.json."""

    name = "topk"

    def __init__(self, k: int = 1, labels: list[str] | None = None):
        odd = [label for label in labels or [] if not isinstance(label, str)]
        if odd:
            raise TypeError(f"labels must be strings, not {odd} (YAML reads yes/no/on/off as booleans: quote them)")
        super().__init__(k=int(k), labels=list(labels) if labels else None)

    def onnx(self) -> list:
        k, labels = self.params["k"], self.params["labels"]

        def build(step, types):
            (kind, shape), = types
            batch = shape.split(",")[0]
            outputs = [f"float[{batch},{k}] {step.output_names[0]}", f"int64[{batch},{k}] {step.output_names[1]}"]
            body = f"""
                k = Constant <value = int64[1] {{{k}}}> ()
                {step.output_names[0]}, {step.output_names[1]} = TopK <axis = -1> ({step.input_names[0]}, k)"""
            if labels:
                names = ", ".join(json.dumps(label) for label in labels)
                outputs.append(f"string[{batch},{k}] {step.output_names[2]}")
                body += f"""
                names = Constant <value = string[{len(labels)}] {{{names}}}> ()
                {step.output_names[2]} = Gather (names, {step.output_names[1]})"""
            return ", ".join(outputs), body, []

        names = ["top_scores", "top_classes"] + (["top_labels"] if labels else [])
        step = TextStep("TopK", ["scores"], names, build)
        return [step]

    def torch(self) -> nn.Module:
        return _TopK(self.params["k"])

    def outputs(self, fmt: str) -> list[str]:
        return ["top_scores", "top_classes"] + (["top_labels"] if self.params["labels"] and fmt == "onnx" else [])

