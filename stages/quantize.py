"""quantize: apply the precision in the IR the target runtime quantizes in.

pte: PT2E with XNNPACKQuantizer (or half precision) on the ExportedProgram.
onnx: the program is exported to an ONNX graph here, and ONNX Runtime's tools apply the
precision to that graph. At fp32 the program passes through unchanged.
"""
from __future__ import annotations

import json

from pipelines.registry import StageContext, stage

from .formats import Job, backend


@stage("quantize", needs=("wrap", "calibrate"), config=("precision.name", "format", "quantize"),
       code=("stages.formats", "stages.model_builder", "stages.tensors"))
def run(ctx: StageContext) -> dict:
    wrap = ctx.input("wrap")
    io = json.loads((wrap.dir / "io.json").read_text())
    job = Job(wrap.dir, io, ctx.cfg.precision.name, ctx.cfg.format, ctx.cfg.quantize,
              ctx.input("calibrate").dir / "calibration.npz", ctx.workdir)
    result = backend(ctx.cfg.format.name).quantize(job)
    return {**result, "summary": result["method"] if result["method"] != "none" else "fp32: unchanged"}
