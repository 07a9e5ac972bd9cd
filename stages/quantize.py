"""quantize: apply the precision in the IR the target runtime quantizes in (convert's output).

pte: PT2E with XNNPACKQuantizer (or half precision) on the ExportedProgram.
onnx: ONNX Runtime's own tools (float16 conversion, static QDQ / dynamic int8) on the ONNX graph.
At fp32 the program passes through unchanged.
"""
from __future__ import annotations

import json

from pipelines.errors import PipelineError
from pipelines.registry import StageContext, stage

from .formats import Job, backend


def _needs(view) -> tuple[str, ...]:
    """Calibration data only where it is used: int8 (dynamic int8 traces one batch of it)."""
    return ("convert", "calibrate") if view["precision"]["name"].startswith("int8") else ("convert",)


@stage("quantize", needs=_needs, config=("precision.name", "format", "quantize", "target"),
       code=("stages.formats", "stages.support.model_builder", "stages.support.tensors", "stages.support.state_io",
             "stages.support.streaming", "stages.support.export_errors", "stages.upstream"))
def run(ctx: StageContext) -> dict:
    converted = ctx.input("convert").dir
    io = json.loads((converted / "io.json").read_text())
    calibration = ctx.inputs.get("calibrate")
    job = Job(converted, io, ctx.cfg.precision.name, ctx.cfg.format, ctx.cfg.quantize,
              calibration.dir / "calibration.npz" if calibration else None, ctx.workdir, ctx.cfg.target)
    try:
        result = backend(ctx.cfg.format.name).quantize(job)
    except PipelineError:
        raise
    except Exception as exc:  # the quantizer's own error: name the node and module it broke on
        from .support.export_errors import quantizer_failure

        raise quantizer_failure(exc) from exc
    (ctx.workdir / "io.json").write_text(json.dumps(io, indent=1))
    return {**result, "summary": result["method"] if result["method"] != "none" else "fp32: unchanged"}
