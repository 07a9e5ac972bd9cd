"""Pre- and post-processing steps an artifact can carry: from what an app has (image bytes, a
waveform, a sentence) to the model's inputs, and from its outputs to what the app shows.

A part declares them in its model entry (`raw: {preprocess: [...], postprocess: [...]}`), each
`{step: <name>, <its parameters>}`. Every step builds:
- its ONNX, with onnxruntime-extensions' pre/post-processing tools (their steps where they exist,
  its custom ops where ONNX has no operator) and plain ONNX operators elsewhere (STFT, Resize,
  TopK), which also run in onnxruntime-web;
- its PyTorch module, for an ExecuTorch program, where its operators lower (None when they
  cannot: decoding an image, tokenizing text).
`plan` decides which leading steps stay in the app for a format and target; those ship as their
own small ONNX file (stages/formats/*.py) and are verified with the artifact.
"""
from __future__ import annotations

from typing import Any, ClassVar, Mapping

from pipelines.errors import PipelineError


class Step:
    """One processing step. Subclasses set `name` and implement onnx() and torch()."""

    name: ClassVar[str]
    custom_op: ClassVar[bool] = False  # its ONNX needs onnxruntime-extensions' custom ops

    def __init__(self, **params: Any):
        self.params = params

    def onnx(self) -> list:
        """onnxruntime-extensions pre/post-processing Steps that make it, in order."""
        raise NotImplementedError

    def torch(self):
        """A torch.nn.Module doing it inside an exported program, or None if it cannot."""
        return None

    def files(self) -> list[str]:
        """Files it reads (a vocabulary), hashed into the cache key."""
        return []

    def outputs(self, fmt: str) -> list[str]:
        """The names of what it returns, in a .onnx or a .pte (post-processing steps)."""
        return [f"{self.name}_out"]

    def describe(self) -> str:
        shown = ", ".join(f"{k}={v}" for k, v in self.params.items() if not isinstance(v, (list, tuple))
                          or len(v) <= 4)
        return f"{self.name}({shown})"


STEPS: dict[str, type[Step]] = {}


def register(cls: type[Step]) -> type[Step]:
    STEPS[cls.name] = cls
    return cls


def build(entry: Mapping[str, Any], where: str) -> Step:
    """The step a config entry names ({step: name, **params})."""
    from . import audio, image, outputs, text  # noqa: F401  register the steps

    params = dict(entry)
    name = params.pop("step", None)
    if name not in STEPS:
        raise PipelineError(f"{where}: unknown processing step {name!r}",
                            fix=f"use one of {sorted(STEPS)}")
    try:
        return STEPS[name](**params)
    except TypeError as exc:
        raise PipelineError(f"{where}: step {name}: {exc}",
                            fix=f"see the parameters of {STEPS[name].__name__} in stages/processing/") from exc


def plan(pre: list[Step], post: list[Step], fmt: str, custom_ops: bool) -> tuple[list[Step], list[Step]]:
    """(the leading steps that stay in the app, the preprocessing inside the artifact): inside,
    the longest tail of the preprocessing the format can hold (.pte: steps with a PyTorch module;
    .onnx: steps whose custom ops the target runtime has); the post-processing must all fit."""
    def fits(step: Step) -> bool:
        return step.torch() is not None if fmt == "pte" else custom_ops or not step.custom_op

    split = len(pre)
    while split > 0 and fits(pre[split - 1]):
        split -= 1
    refused = [s.name for s in post if not fits(s)]
    if refused:
        raise PipelineError(f"post-processing steps {refused} cannot go inside a .{fmt} for this target",
                            fix="drop them from raw.postprocess: the app does them on the outputs")
    return pre[:split], pre[split:]


def why_in_app(step: Step, fmt: str) -> str:
    """Why a step stays in the app, in one phrase."""
    if fmt == "pte":
        return f"{step.name} has no operator an ExecuTorch program can run"
    return f"{step.name} needs onnxruntime-extensions' custom ops, which this target's runtime lacks"


ONNX_TYPES = {"float32": 1, "uint8": 2, "int32": 6, "int64": 7, "string": 8, "bool": 9, "float16": 10}


def value_info(spec: Mapping[str, Any]):
    """An ONNX graph input for a tensor spec; its dynamic dims get their names (`bytes`)."""
    import onnx

    dynamic = {int(d): name for d, name in (spec.get("dynamic") or {}).items()}
    shape = [dynamic.get(i, size) for i, size in enumerate(spec["shape"])]
    return onnx.helper.make_tensor_value_info(spec["name"], ONNX_TYPES[spec["dtype"]], shape)


def onnx_model(inputs: list[Mapping[str, Any]], pre: list[Step], post: list[Step], model=None, opset: int = 18):
    """`model` (the empty graph when None: the steps alone) with `pre` before it, fed `inputs`,
    and `post` on its first output: onnxruntime-extensions' PrePostProcessor joins them."""
    import onnx
    from onnxruntime_extensions.tools.pre_post_processing import PrePostProcessor

    model = model or onnx.helper.make_model(onnx.helper.make_graph([], "steps", [], []),
                                            opset_imports=[onnx.helper.make_opsetid("", opset)])
    processor = PrePostProcessor([value_info(spec) for spec in inputs], opset)
    if pre:
        processor.add_pre_processing([part for step in pre for part in step.onnx()])
    if post:
        processor.add_post_processing([part for step in post for part in step.onnx()])
    return processor.run(model)


def app_model(raw: list[Mapping[str, Any]], app: list[Step], names: list[str] | None, opset: int = 18):
    """The steps that stay in the app as their own graph, raw inputs in; its outputs renamed to
    `names` (the model's inputs, when the app's steps feed the model itself)."""
    model = onnx_model(raw, app, [], opset=opset)
    for value, name in zip(list(model.graph.output), names or []):
        old = value.name
        for node in model.graph.node:
            node.output[:] = [name if o == old else o for o in node.output]
            node.input[:] = [name if i == old else i for i in node.input]
        value.name = name
    return model


def uses_custom_ops(model) -> bool:
    """Whether an ONNX model has onnxruntime-extensions' operators (its session must register
    the extensions library)."""
    return any(node.domain in ("com.microsoft.extensions", "ai.onnx.contrib") for node in model.graph.node)


def spec(value) -> dict[str, Any]:
    """An ONNX graph input or output as a tensor spec (symbolic dims dynamic, sized 1)."""
    import onnx

    tensor = value.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else 1 for d in tensor.shape.dim]
    dynamic = {str(i): d.dim_param or f"{value.name}_{i}" for i, d in enumerate(tensor.shape.dim)
               if not d.HasField("dim_value")}
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)
    return {"name": value.name, "shape": dims, "dtype": "string" if dtype.kind == "O" else str(dtype),
            "dynamic": dynamic, "kwarg": None, "low": 0.0, "high": 1.0, "max": 1024, "length_of": None}
