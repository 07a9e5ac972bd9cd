"""quantize: apply the precision in the IR the target runtime quantizes in (convert's output).

Each format registers a scheme per precision (stages/formats/schemes.py): PT2E with
XNNPACKQuantizer or half precision on the ExportedProgram for .pte, ONNX Runtime's own tools on
the graph for .onnx. At fp32 the program passes through unchanged.
"""
from __future__ import annotations

import json

from pipelines.errors import PipelineError
from pipelines.registry import StageContext, stage

from .formats import Job, format_code, format_libraries
from .formats.schemes import chosen, options


def _needs(view) -> tuple[str, ...]:
    """Calibration data only where the scheme reads it."""
    calibrated = chosen(view["precision"]["name"], view["format"]["name"]).calibrated
    return ("convert", "calibrate") if calibrated else ("convert",)


@stage("quantize", needs=_needs, config=("precision.name", "precision.options", "format", "quantize", "target"),
       code=format_code, libraries=format_libraries("quantize"))
def run(ctx: StageContext) -> dict:
    converted = ctx.input("convert").dir
    io = json.loads((converted / "io.json").read_text())
    calibration = ctx.inputs.get("calibrate")
    precision, fmt = ctx.cfg.precision.name, ctx.cfg.format.name
    job = Job(converted, io, precision, ctx.cfg.format, ctx.cfg.quantize,
              calibration.dir / "calibration.npz" if calibration else None, ctx.workdir, ctx.cfg.target,
              options(ctx.cfg.precision, fmt))
    try:
        method = chosen(precision, fmt).apply(job)
    except PipelineError:
        raise
    except Exception as exc:  # the quantizer's own error: name the node and module it broke on
        from .support.export_errors import quantizer_failure

        raise quantizer_failure(exc) from exc
    (ctx.workdir / "io.json").write_text(json.dumps(io, indent=1))
    if method == "none":
        return {"method": method, "summary": f"{precision}: unchanged"}
    keep = list(ctx.cfg.quantize.keep_float)
    method += f", kept float: {', '.join(keep)}" if keep else ""
    return {"method": method, "summary": method}
