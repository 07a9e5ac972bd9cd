"""lower: write the deployable file (.pte or .onnx) and the io.json an app reads beside it."""
from __future__ import annotations

import json
import shutil

from pipelines.registry import StageContext, stage

from .formats import Job, backend


@stage("lower", needs=("wrap", "quantize"), config=("precision.name", "format"),
       code=("stages.formats",), artifacts=("model.*", "io.json"))
def run(ctx: StageContext) -> dict:
    io_file = ctx.input("wrap").dir / "io.json"
    job = Job(ctx.input("quantize").dir, json.loads(io_file.read_text()), ctx.cfg.precision.name,
              ctx.cfg.format, None, None, ctx.workdir)
    result = backend(ctx.cfg.format.name).lower(job)
    shutil.copy2(io_file, ctx.workdir / "io.json")
    return {**result, "summary": result["artifact"]}
