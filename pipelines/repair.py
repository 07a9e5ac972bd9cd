"""What a cell does when it breaks (`quantize.on_failure`): fail, keep layers float, or go fp32.

`mixed` keeps the layer the failure names at full precision and rebuilds from quantize, one
layer at a time (verify's diagnosis names the layer whose error jumps; a quantizer or lowering
error names the module of the node it broke on) until the tolerance holds, or
`quantize.max_float_layers` is reached, or a layer kept float does not cut the error (it builds
up across the model); then, as `fp32` does at once, it rebuilds the whole cell at fp32, judged
by the tolerance `precision=fp32` has with the fields `quantize.fallback_tolerance` sets.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from .errors import PipelineError
from .schema import StoredWeights, Tolerance

FP32 = Path(__file__).resolve().parents[1] / "conf" / "precision" / "fp32.yaml"
RETRYABLE = ("quantize", "preprocess", "lower", "verify", "verify_target", "size_audit")  # rebuildable


def repair(root: dict[str, Any], run, failed: str, exc: PipelineError, log) -> bool:
    """Set root up for the next attempt and return True, or return False: the cell fails."""
    policy, precision = root["quantize"]["on_failure"], root["precision"]["name"]
    if failed not in RETRYABLE or precision == "fp32" or policy == "error":
        return False
    run.attempts.append({"precision": precision, "keep_float": list(root["quantize"]["keep_float"]),
                         "stage": failed, "reason": exc.message, "max_rel": _worst_relative(run, failed),
                         "bytes": _artifact_bytes(run) if failed in ("verify", "size_audit") else None})
    stalled = _stalled(run.attempts)
    layer = _layer_to_keep(root, run, failed, exc) if policy == "mixed" and not stalled else None
    if stalled:
        exc = PipelineError(f"{exc.message}; {stalled}", stage=exc.stage, fix=exc.fix, module=exc.module)
    if layer:
        root["quantize"] = {**root["quantize"], "keep_float": [*root["quantize"]["keep_float"], layer]}
        run.status, run.float_layers = "mixed", list(root["quantize"]["keep_float"])
        log.info("  %s failed at %s (%s): keeping %s at fp32", failed, precision, exc.message, layer)
        return True
    log.info("  %s failed at %s (%s): falling back to fp32", failed, precision, exc.message)
    run.status, run.fallback_reason = "fallback", f"fell back to fp32: {exc}"
    run.float_layers = []
    root["precision"] = {"name": "fp32", "tolerance": _fp32_tolerance(root["quantize"]["fallback_tolerance"]),
                         "options": {}, "weights": asdict(StoredWeights())}
    root["quantize"] = {**root["quantize"], "keep_float": []}
    return True


def _fp32_tolerance(override: dict[str, Any]) -> dict[str, Any]:
    """conf/precision/fp32.yaml's tolerance with the fields `override` sets (the others are "???")."""
    from omegaconf import MISSING, OmegaConf

    fp32 = {**asdict(Tolerance()), **OmegaConf.to_container(OmegaConf.load(FP32).tolerance)}
    return {**fp32, **{key: value for key, value in override.items() if value != MISSING}}


def _layer_to_keep(root: dict[str, Any], run, failed: str, exc: PipelineError) -> str | None:
    """The next layer to keep float: the module a quantize/lower error names, else the first of
    verify's suspects not yet kept; None past quantize.max_float_layers."""
    kept = set(root["quantize"]["keep_float"])
    if len(kept) >= root["quantize"]["max_float_layers"]:
        return None
    candidates = [exc.module] if exc.module else []
    if failed == "verify":
        candidates += [s["module"] for s in (run.result("verify").get("diagnosis") or {}).get("suspects", [])]
    if failed == "verify_target":  # each failing device's own diagnosis, in the target's order
        candidates += [s["module"] for device in (run.result("verify_target").get("devices") or {}).values()
                       for s in (device.get("diagnosis") or {}).get("suspects", [])]
    return next((c for c in candidates if c and c not in kept), None)


PROGRESS = 0.8  # a layer kept float must cut the worst relative error to this share, or mixing stops


def _worst_relative(run, failed: str) -> float | None:
    """The attempt's worst output error relative to that output's largest value (verify's)."""
    outputs = (run.result("verify").get("outputs") or {}).values() if failed == "verify" else []
    return max((o["max_rel"] for o in outputs if "max_rel" in o), default=None)


def _stalled(attempts: list[dict[str, Any]]) -> str:
    """Why keeping more layers float is not helping ("" while it is): each of the last two
    layers kept cut the worst relative error by less than 1 - PROGRESS. The error then builds
    up across the model, and every further attempt would cost a rebuild and a verification."""
    last = attempts[-3:]
    if len(last) < 3 or any(a["precision"] != last[-1]["precision"] or a["max_rel"] is None for a in last):
        return ""
    if any(later["max_rel"] < PROGRESS * earlier["max_rel"] for earlier, later in zip(last, last[1:])):
        return ""
    kept = ", ".join(k for k in last[-1]["keep_float"] if k not in last[0]["keep_float"])
    return (f"keeping {kept} float left the error at {last[-1]['max_rel']:.2e} of the largest value "
            f"(was {last[0]['max_rel']:.2e}): it builds up across the model")


def _artifact_bytes(run) -> int:
    """Size of the artifact the failed attempt built, with its external data."""
    lower = run.outputs["lower"]
    return sum(p.stat().st_size for p in lower.dir.glob(lower.result["artifact"] + "*") if p.is_file())
