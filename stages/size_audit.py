"""size_audit: what the artifact costs to ship, and proof that the precision really happened."""
from __future__ import annotations

import json
import zlib
from typing import Any

from pipelines.registry import StageContext, stage

from .formats import backend, format_code


@stage("size_audit", needs=("wrap", "lower"),
       config=("precision.name", "precision.weights", "format.name", "quantize.keep_float"),
       code=format_code, artifacts=("size_audit.json",))
def run(ctx: StageContext) -> dict:
    lower = ctx.input("lower")
    artifact = lower.dir / lower.result["artifact"]
    files = sorted(p for p in lower.dir.glob(artifact.name + "*") if p.is_file())  # with .data
    file_bytes = sum(p.stat().st_size for p in files)
    compressor = zlib.compressobj(9)
    compressed = 0
    for path in files:  # in chunks: a 4 GB model is never read whole
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 24):
                compressed += len(compressor.compress(chunk))
    compressed += len(compressor.flush())
    parameters = ctx.input("wrap").result["parameters"]
    inspection = backend(ctx.cfg.format.name).inspect(artifact)
    report: dict[str, Any] = {
        "files": [p.name for p in files], "file_bytes": file_bytes, "compressed_bytes": compressed,
        "parameters": parameters, "fp32_parameter_bytes": parameters * 4,
        "ratio_to_fp32_parameters": round(file_bytes / max(parameters * 4, 1), 4),
        **inspection,
    }
    report["bytes_per_parameter"] = round(file_bytes / max(parameters, 1), 3)
    kept = kept_parameters(ctx.input("wrap").dir / "modules.json", list(ctx.cfg.quantize.keep_float))
    if kept:
        report["kept_float_parameters"] = kept
    io = json.loads((lower.dir / "io.json").read_text())
    processing = (io.get("processing") or {}).get("constant_bytes", 0)  # a log-mel's DFT kernels
    if processing:
        report["processing_constant_bytes"] = processing
    report["passed"], report["reason"] = check_precision(ctx.cfg.precision, inspection,
                                                         kept * 4 + processing)
    report["warnings"] = []
    if report["passed"]:
        report["passed"], report["reason"], report["warnings"] = check_file(  # float on purpose aside
            ctx.cfg.precision, file_bytes - kept * 4 - processing, parameters - kept)
    (ctx.workdir / "size_audit.json").write_text(json.dumps(report, indent=1))
    report["summary"] = (f"{file_bytes / 1024:.1f} KiB ({compressed / 1024:.1f} KiB zlib), "
                         f"{report['ratio_to_fp32_parameters']:.2f}x fp32 weights"
                         + (f", {inspection['delegated_share']:.0%} delegated"
                            if "delegated_share" in inspection else "")
                         + ("" if report["passed"] else f" - AUDIT FAILED: {report['reason']}"))
    return report


def kept_parameters(modules_json, keep: list[str]) -> int:
    """Weights of the modules kept float (a module inside another kept one counted once)."""
    if not keep:
        return 0
    modules = json.loads(modules_json.read_text())
    outer = [k for k in keep if not any(k.startswith(o + ".") for o in keep if o != k)]
    return sum(modules.get(path, {}).get("parameters", 0) for path in set(outer))


def check_precision(precision: dict[str, Any], inspection: dict[str, Any], float_bytes: int = 0) -> tuple[bool, str]:
    """The artifact must hold its precision's weights (`precision.weights.dtypes`) and, where it
    is quantized, quantization ops, in all but the bytes that are float on purpose: `float_bytes`
    (layers kept float, processing steps' constants)."""
    name, wanted = precision["name"], precision["weights"]
    share, weights = inspection["weight_share_by_dtype"], inspection["weight_bytes_by_dtype"]
    exempt = float_bytes
    judged = max(sum(weights.values()) - exempt, 1)
    besides = f" besides {exempt:,} bytes float on purpose" if exempt else ""
    held = sum(weights.get(dtype, 0) for dtype in wanted["dtypes"])
    if wanted["dtypes"] and held < 0.5 * judged:
        return False, f"precision {name} but {'/'.join(wanted['dtypes'])} holds only {held / judged:.0%} " \
                      f"of the weight bytes{besides} ({share})"
    if wanted["quantized"] and inspection["quantize_ops"] + inspection["dequantize_ops"] == 0 and \
            not inspection.get("quantized_ops"):
        return False, f"precision {name} but the graph has no quantization ops"
    return True, ""


WEIGHTS_DOMINATE = 64 * 1024  # fp32 parameter bytes above which the weights dominate the file


def check_file(precision: dict[str, Any], file_bytes: int, parameters: int) -> tuple[bool, str, list[str]]:
    """The shipped file, not only the program, must be the size its precision promises
    (`precision.weights.max_bytes_per_parameter`).

    A backend may serialize weights wider than it computes with (XNNPACK stores convolution
    weights as fp32 in an fp16 .pte): the download then does not shrink. Where the precision
    says `oversize_fails: false` (fp16: the compute is still half precision) that is a warning
    that names the cost, else the audit fails.
    """
    name, limit = precision["name"], precision["weights"]["max_bytes_per_parameter"]
    per_parameter = file_bytes / max(parameters, 1)
    if limit is None or parameters * 4 < WEIGHTS_DOMINATE or per_parameter <= limit:
        return True, "", []
    finding = (f"the {name} file holds {per_parameter:.1f} bytes per parameter "
               f"(fp32 is 4): its weights are not stored at {name}")
    if not precision["weights"]["oversize_fails"]:
        return True, "", [finding + f"; the runtime computes in {name} but the download is not smaller"]
    return False, finding, []

