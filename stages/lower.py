"""lower: write the deployable file (.pte or .onnx) and the io.json an app reads beside it,
with state.json when the app carries state from call to call, and app_steps.onnx / labels.json
when processing steps stay in the app (stages/preprocess.py)."""
from __future__ import annotations

import json

from pipelines.digests import link_or_copy
from pipelines.registry import StageContext, stage

from .formats import Job, backend, format_code, format_libraries


APP_SIDE = ("app_steps.onnx", "labels.json")  # what ships beside the artifact for the app


@stage("lower", needs=("preprocess",), config=("precision.name", "format"),
       code=format_code,
       artifacts=("model.*", "io.json", "state.json", "repro", *APP_SIDE), libraries=format_libraries("lower"))
def run(ctx: StageContext) -> dict:
    source = ctx.input("preprocess").dir
    io = json.loads((source / "io.json").read_text())  # the program quantize picked, processing inside
    job = Job(source, io, ctx.cfg.precision.name, ctx.cfg.format, None, None, ctx.workdir)
    result = backend(ctx.cfg.format.name).lower(job)
    for name in APP_SIDE:
        if (source / name).exists():
            link_or_copy(source / name, ctx.workdir / name)
    if "session" in result:  # how an app must create its onnxruntime session for this graph
        io["session"] = result["session"]
    (ctx.workdir / "io.json").write_text(json.dumps(io, indent=1))
    if io["state"]:
        (ctx.workdir / "state.json").write_text(json.dumps(io["state"], indent=1))
    carried = f", state as I/O: {len(io['state'])} tensors (state.json)" if io["state"] else ""
    return {**result, "summary": result["artifact"] + carried}
