"""size_audit: what the artifact costs to ship, and proof that the precision really happened."""
from __future__ import annotations

import json
import zlib
from typing import Any

from pipelines.registry import StageContext, stage

from .formats import backend


@stage("size_audit", needs=("wrap", "lower"), config=("precision.name", "format.name"),
       code=("stages.formats",), artifacts=("size_audit.json",))
def run(ctx: StageContext) -> dict:
    lower = ctx.input("lower")
    artifact = lower.dir / lower.result["artifact"]
    files = sorted(p for p in lower.dir.glob(artifact.name + "*") if p.is_file())  # with .data
    file_bytes = sum(p.stat().st_size for p in files)
    compressor = zlib.compressobj(9)
    compressed = 0
    for path in files:
        compressed += len(compressor.compress(path.read_bytes()))
    compressed += len(compressor.flush())
    parameters = ctx.input("wrap").result["parameters"]
    inspection = backend(ctx.cfg.format.name).inspect(artifact)
    report: dict[str, Any] = {
        "files": [p.name for p in files], "file_bytes": file_bytes, "compressed_bytes": compressed,
        "parameters": parameters, "fp32_parameter_bytes": parameters * 4,
        "ratio_to_fp32_parameters": round(file_bytes / max(parameters * 4, 1), 4),
        **inspection,
    }
    report["passed"], report["reason"] = check_precision(ctx.cfg.precision.name, inspection)
    (ctx.workdir / "size_audit.json").write_text(json.dumps(report, indent=1))
    report["summary"] = (f"{file_bytes / 1024:.1f} KiB ({compressed / 1024:.1f} KiB zlib), "
                         f"{report['ratio_to_fp32_parameters']:.2f}x fp32 weights"
                         + (f", {inspection['delegated_share']:.0%} delegated"
                            if "delegated_share" in inspection else "")
                         + ("" if report["passed"] else f" - AUDIT FAILED: {report['reason']}"))
    return report


def check_precision(precision: str, inspection: dict[str, Any]) -> tuple[bool, str]:
    """An int8 artifact must hold int8 weights and quantization ops; an fp16 one, fp16 weights."""
    share = inspection["weight_share_by_dtype"]
    if precision in ("int8", "int8_dynamic"):
        if share.get("int8", 0) + share.get("uint8", 0) < 0.5:
            return False, f"precision {precision} but int8 holds only {share.get('int8', 0):.0%} " \
                          f"of the weight bytes ({share})"
        if inspection["quantize_ops"] + inspection["dequantize_ops"] == 0 and \
                not inspection.get("quantized_ops"):
            return False, f"precision {precision} but the graph has no quantization ops"
    if precision == "fp16" and share.get("float16", 0) < 0.5:
        return False, f"precision fp16 but float16 holds only {share.get('float16', 0):.0%} of the weight bytes"
    return True, ""
