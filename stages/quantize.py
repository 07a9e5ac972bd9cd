"""quantize: apply the precision in the IR the target runtime quantizes in (convert's output).

pte: PT2E with XNNPACKQuantizer (or half precision) on the ExportedProgram.
onnx: ONNX Runtime's own tools (float16 conversion, static QDQ / dynamic int8) on the ONNX graph.
At fp32 the program passes through unchanged.
"""
from __future__ import annotations

import json

from pipelines.registry import StageContext, stage

from .formats import Job, backend


@stage("quantize", needs=("convert", "calibrate"), config=("precision.name", "format", "quantize"),
       code=("stages.formats", "stages.model_builder", "stages.tensors", "stages.state_io",
             "stages.streaming"))
def run(ctx: StageContext) -> dict:
    converted = ctx.input("convert").dir
    io = json.loads((converted / "io.json").read_text())
    job = Job(converted, io, ctx.cfg.precision.name, ctx.cfg.format, ctx.cfg.quantize,
              ctx.input("calibrate").dir / "calibration.npz", ctx.workdir)
    result = backend(ctx.cfg.format.name).quantize(job)
    (ctx.workdir / "io.json").write_text(json.dumps(io, indent=1))
    return {**result, "summary": result["method"] if result["method"] != "none" else "fp32: unchanged"}
