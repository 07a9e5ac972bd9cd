"""convert: the wrapped program in the IR its runtime quantizes in, at fp32: once per format.

onnx: the torch.onnx (dynamo) export of the program; pte: the ExportedProgram itself.
For a part whose forward updates buffers, `wrap.state` and the format pick the program: state
kept inside, or lifted to inputs and outputs. io.json says which inputs and outputs it has.
Every precision of a sweep quantizes this one entry.
"""
from __future__ import annotations

import json

from pipelines.registry import StageContext, stage

from .formats import Job, backend, format_code, format_libraries


@stage("convert", needs=("wrap",), config=("format", "wrap.state"),
       code=format_code,
       artifacts=("repro",), libraries=format_libraries("convert"))
def run(ctx: StageContext) -> dict:
    from .support.state_io import select

    fmt = backend(ctx.cfg.format.name)
    source, io = select(ctx.input("wrap").dir, ctx.cfg.wrap.state, ctx.cfg.format.name,
                        fmt.KEEPS_STATE)
    result = fmt.convert(Job(source, io, "fp32", ctx.cfg.format, None, None, ctx.workdir))
    (ctx.workdir / "io.json").write_text(json.dumps(io, indent=1))
    return {**result, "summary": result["method"]}
