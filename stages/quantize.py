"""quantize: apply the precision in the IR the target runtime quantizes in.

pte: PT2E with XNNPACKQuantizer (or half precision) on the ExportedProgram.
onnx: the program is exported to an ONNX graph here, and ONNX Runtime's tools apply the
precision to that graph. At fp32 the program passes through unchanged.
For a part whose forward updates buffers, `wrap.state` and the format pick the program: state
kept inside, or lifted to inputs and outputs. io.json says which inputs and outputs it has.
"""
from __future__ import annotations

import json

from pipelines.registry import StageContext, stage

from .formats import Job, backend


@stage("quantize", needs=("wrap", "calibrate"),
       config=("precision.name", "format", "quantize", "wrap.state"),
       code=("stages.formats", "stages.model_builder", "stages.tensors", "stages.state_io",
             "stages.streaming"))
def run(ctx: StageContext) -> dict:
    from .state_io import select

    fmt = backend(ctx.cfg.format.name)
    source, io = select(ctx.input("wrap").dir, ctx.cfg.wrap.state, ctx.cfg.format.name,
                        fmt.KEEPS_STATE)
    job = Job(source, io, ctx.cfg.precision.name, ctx.cfg.format, ctx.cfg.quantize,
              ctx.input("calibrate").dir / "calibration.npz", ctx.workdir)
    result = fmt.quantize(job)
    (ctx.workdir / "io.json").write_text(json.dumps(io, indent=1))
    return {**result, "summary": result["method"] if result["method"] != "none" else "fp32: unchanged"}
