"""lower: write the deployable file (.pte or .onnx) and the io.json an app reads beside it,
with state.json when the app carries state from call to call."""
from __future__ import annotations

import json

from pipelines.registry import StageContext, stage

from .formats import Job, backend


@stage("lower", needs=("quantize",), config=("precision.name", "format"),
       code=("stages.formats", "stages.upstream"), artifacts=("model.*", "io.json", "state.json"))
def run(ctx: StageContext) -> dict:
    quantized = ctx.input("quantize").dir
    io = json.loads((quantized / "io.json").read_text())  # the program quantize picked
    job = Job(quantized, io, ctx.cfg.precision.name, ctx.cfg.format, None, None, ctx.workdir)
    result = backend(ctx.cfg.format.name).lower(job)
    (ctx.workdir / "io.json").write_text(json.dumps(io, indent=1))
    if io["state"]:
        (ctx.workdir / "state.json").write_text(json.dumps(io["state"], indent=1))
    carried = f", state as I/O: {len(io['state'])} tensors (state.json)" if io["state"] else ""
    return {**result, "summary": result["artifact"] + carried}
