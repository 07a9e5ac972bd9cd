"""preprocess: with preprocess=raw, the part's processing steps go inside the artifact, so it
takes what an app has (image bytes, a waveform, a sentence) and gives what it shows.

The steps the format or the target's runtime cannot hold (decoding an image, tokenizing text:
custom operators that a .pte or onnxruntime-web lacks) stay in the app and ship beside the
artifact as app_steps.onnx; io.json says which steps are where, and whether an onnxruntime
session must register onnxruntime-extensions. With preprocess=none (the default) quantize's
program passes through untouched.
"""
from __future__ import annotations

import json
from typing import Any

from pipelines.digests import link_or_copy
from pipelines.errors import PipelineError
from pipelines.registry import StageContext, stage

from .formats import Job, backend, format_code
from .support.tensors import dataset_files


def _raw(view) -> dict[str, Any] | None:
    return view["part"].get("raw") if view["preprocess"]["mode"] == "raw" else None


def _files(view) -> list[str]:
    """The files the steps read (a vocabulary) and the raw examples' data files."""
    raw = _raw(view)
    if not raw:
        return []
    from .processing import build

    return ([f for s in [*raw["preprocess"], *raw["postprocess"]] for f in build(s, "raw").files()]
            + dataset_files(raw.get("eval_data")))


@stage("preprocess", needs=("quantize",),
       config=("preprocess", "part", "format", "target.onnx_custom_ops"), reads=_files,
       code=format_code,
       artifacts=("app_steps.onnx", "labels.json"))
def run(ctx: StageContext) -> dict:
    quantized = ctx.input("quantize")
    io = json.loads((quantized.dir / "io.json").read_text())
    raw = _raw(ctx.cfg)
    if ctx.cfg.preprocess.mode == "none":
        for path in quantized.dir.iterdir():
            if path.is_file():
                link_or_copy(path, ctx.workdir / path.name)
        return {"method": "none", "summary": "the model's own inputs (preprocess=none)"}
    part = ctx.cfg.part
    if not raw:
        raise PipelineError(f"preprocess=raw but part '{part.name}' declares no raw inputs",
                            fix="add raw: {inputs, preprocess, postprocess, reference, eval_data} "
                                "to the part (README: Raw inputs), or use preprocess=none")
    if io["state"] or io["internal_state"]:
        raise PipelineError(f"part '{part.name}' carries state between calls: raw inputs are "
                            "supported for stateless parts", fix="use preprocess=none for it")
    return _attach(ctx, raw, io)


def _attach(ctx: StageContext, raw, io: dict[str, Any]) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from .processing import build, plan, why_in_app
    from .support.raw import raw_examples

    name, fmt = ctx.cfg.part.name, ctx.cfg.format.name
    pre = [build(s, f"part '{name}' raw.preprocess[{i}]") for i, s in enumerate(raw.preprocess)]
    post = [build(s, f"part '{name}' raw.postprocess[{i}]") for i, s in enumerate(raw.postprocess)]
    app, inside = plan(pre, post, fmt, custom_ops=fmt != "onnx" or ctx.cfg.target.onnx_custom_ops)
    specs = [OmegaConf.to_container(s, resolve=True) for s in raw.inputs]
    job = Job(ctx.input("quantize").dir, io, "", ctx.cfg.format, None, None, ctx.workdir)
    extra = {"example": raw_examples(raw, specs, count=1)[0][0]} if fmt == "pte" else {}
    made = backend(fmt).attach(job, specs, app, inside, post, **extra)
    labels = next((s.params["labels"] for s in post if s.params.get("labels")), None)
    if labels and fmt == "pte":  # a program holds no strings: the app maps classes to names
        (ctx.workdir / "labels.json").write_text(json.dumps(labels, indent=1))
    processing = {
        "raw_inputs": [s["name"] for s in specs],
        "in_app": [{"step": s.describe(), "why": why_in_app(s, fmt)} for s in app],
        "app_steps": "app_steps.onnx" if app else None,
        "inside": [s.describe() for s in inside + post],
        "custom_ops": "onnxruntime-extensions" if fmt == "onnx" and any(s.custom_op for s in inside) else None,
        "app_steps_custom_ops": "onnxruntime-extensions" if any(s.custom_op for s in app) else None,
        "labels": "labels.json" if labels and fmt == "pte" else None,
        "constant_bytes": made["constant_bytes"]}  # float on purpose: the audit does not count them
    (ctx.workdir / "io.json").write_text(json.dumps(
        {"inputs": made["inputs"], "outputs": made["outputs"], "state": [], "internal_state": [],
         "processing": processing}, indent=1))
    where = f"; in the app: {', '.join(s.name for s in app)} (app_steps.onnx)" if app else ""
    return {"method": "raw inputs", "processing": processing,
            "summary": f"takes {', '.join(processing['raw_inputs'])}: inside "
                       f"{', '.join(s.name for s in inside + post) or 'nothing'}{where}"}
