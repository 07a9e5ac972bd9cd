"""What a run leaves for people (a short table) and machines (report.json, manifest.json)."""
from __future__ import annotations

import platform
import sys
from pathlib import Path
from typing import Any

from .cache import human_bytes
from .runner import PartRun
from .versions import git_commit, host_cpu, library_versions, sha256_file


def part_report(run: PartRun, run_dir: Path) -> dict[str, Any]:
    verify = {k: v for k, v in run.result("verify").items() if k != "summary"}
    size = {k: v for k, v in run.result("size_audit").items() if k != "summary"}
    lower = run.result("lower")
    artifact = run_dir / "artifacts" / run.part / lower["artifact"] if lower else None
    return {
        "part": run.part, "status": run.status, "error": run.error,
        "repair": run.fallback_reason or _mixed_reason(run, size),  # what quantize.on_failure did
        "float_layers": run.float_layers, "attempts": run.attempts,
        "artifact": str(artifact) if artifact and artifact.exists() else None,
        "quantization": run.result("quantize").get("method"),
        "warnings": [w for stage in ("lower", "size_audit") for w in run.result(stage).get("warnings", [])],
        "verify": verify or None, "size": size or None,
        "latency": _latency(run.result("benchmark")), "target": _target(run.result("verify_target")),
        "seconds": round(sum(r.seconds for r in run.records), 3),
        "cache_hits": sum(r.hit for r in run.records), "stages_run": len(run.records),
    }


def _latency(benchmark: dict[str, Any]) -> dict[str, Any] | None:
    keys = ("runtime", "threads", "p50_ms", "p90_ms", "runs", "eager_p50_ms", "speedup", "load_average",
            "steps", "profile")
    return {k: benchmark[k] for k in keys if k in benchmark} if "p50_ms" in benchmark else None


def _target(check: dict[str, Any]) -> dict[str, Any] | None:
    """The target's verdict and each device's figures (verify_target), when it has devices."""
    if not check:
        return None
    return {"status": check["status"], "reason": check.get("reason"),
            "devices": {name: device_figures(d) for name, d in (check.get("devices") or {}).items()}}


def device_figures(device: dict[str, Any]) -> dict[str, Any]:
    """One device's verdict and figures, as the tables show them."""
    outputs = (device.get("outputs") or {}).values()
    agreement = device.get("top1_agreement") or {}
    accuracy = device.get("accuracy") or {}
    top1 = min([*agreement.values(), *([accuracy["top1_agreement"]] if accuracy else [])], default=None)
    cpu = device.get("cpu") or {}
    return {"status": device["status"], "mode": device.get("mode"), "runtime": device.get("runtime"),
            "reason": device.get("reason"), "max_abs": max((o["max_abs"] for o in outputs), default=None),
            "cosine": min((o["cosine"] for o in outputs), default=None), "top1_agreement": top1,
            "stream_max_abs": (device.get("stream") or {}).get("max_abs"),
            "cpu_flags": [f for f in cpu.get("flags", []) if f in NUMERIC_FLAGS],
            "p50_ms": (device.get("latency") or {}).get("p50_ms"), "seconds": device.get("seconds")}


NUMERIC_FLAGS = ("asimd", "asimdhp", "asimddp", "asimdfhm", "sve", "avx2", "f16c", "fma3", "avx512f",
                 "avx512vnni", "avx512fp16")  # what int8/fp16 kernels choose their paths by (numpy's names)


def _mixed_reason(run: PartRun, size: dict[str, Any]) -> str | None:
    """What keeping layers float bought and cost, for a cell quantize.on_failure=mixed repaired."""
    if run.status != "mixed":
        return None
    first = next((a for a in run.attempts if a.get("bytes")), None)
    change = size.get("file_bytes", 0) - first["bytes"] if first else 0
    cost = (f" ({'+' if change >= 0 else '-'}{human_bytes(abs(change))} against the "
            f"{human_bytes(first['bytes'])} all-{first['precision']} build)"
            if first and size.get("file_bytes") else "")
    return (f"kept float: {', '.join(run.float_layers)}{cost}; "
            f"first attempt failed: [{run.attempts[0]['stage']}] {run.attempts[0]['reason']}")


STATUS_ORDER = ("fail", "fallback", "mixed", "pass")  # a run takes its worst part's status


def run_report(root: dict[str, Any], runs: list[PartRun], run_dir: Path, seconds: float) -> dict[str, Any]:
    parts = [part_report(run, run_dir) for run in runs]
    statuses = {p["status"] for p in parts}
    status = next(s for s in STATUS_ORDER if s in statuses or s == "pass")
    return {"recipe": root["recipe"], "model": root["model"]["name"],
            "precision": root["precision"]["name"], "format": root["format"]["name"],
            "status": status, "seconds": round(seconds, 3), "run_dir": str(run_dir), "parts": parts}


def manifest(root: dict[str, Any], runs: list[PartRun], run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """Enough to reproduce the run and to prove that a re-run produced the same bytes."""
    checkpoint = root["model"]["checkpoint"]
    files = next((r.files for run in runs for r in run.records if r.stage == "load_checkpoint"), {})
    return {
        "python": platform.python_version(), "packages": library_versions(), "host_cpu": host_cpu(),
        "git_commit": git_commit(Path(__file__).resolve().parent.parent),
        "command": sys.argv, "overrides": overrides,
        "checkpoint": {"path": checkpoint, "sha256": files.get(checkpoint)},
        "parts": {run.part: {
            "stages": [{"stage": r.stage, "key": r.key, "cache": "hit" if r.hit else "miss",
                        "seconds": round(r.seconds, 3), "peak_mb": r.peak_mb} for r in run.records],
            "artifacts": {p.name: run.artifact_digests.get(p.name) or sha256_file(p) for p in
                          sorted((run_dir / "artifacts" / run.part).glob("*")) if p.is_file()},
        } for run in runs},
    }


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    line = "  ".join("{:<%d}" % w for w in widths)
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line.format(*header), rule] + [line.format(*map(str, r)) for r in rows])


def summary_table(report: dict[str, Any]) -> str:
    header = ["part", "status", "artifact", "size", "zlib", "max abs", "cosine", "accuracy",
              "p50 ms", "vs eager", "devices", "cache", "seconds"]
    rows = []
    for part in report["parts"]:
        verify, size = part["verify"] or {}, part["size"] or {}
        outputs = (verify.get("outputs") or {}).values()
        acc = verify.get("accuracy")
        rows.append([
            part["part"], part["status"].upper(), _relative(part["artifact"], report["run_dir"]),
            human_bytes(size.get("file_bytes")), human_bytes(size.get("compressed_bytes")),
            f"{max(o['max_abs'] for o in outputs):.2e}" if outputs else "-",
            f"{min(o['cosine'] for o in outputs):.6f}" if outputs else "-",
            f"{acc['eager']:.2%} -> {acc['artifact']:.2%}" if acc else "-",
            *latency_cells(part["latency"]), target_cell(part["target"]),
            f"{part['cache_hits']}/{part['stages_run']} hits", f"{part['seconds']:.1f}",
        ])
    title = (f"{report['model']}  {report['precision']} -> {report['format']}  "
             f"(recipe {report['recipe']}): {report['status'].upper()}   "
             f"{_relative(report['run_dir'], str(Path.cwd()))}")
    notes = [f"  {p['part']}: {p['error'] or p['repair']}" for p in report["parts"]
             if p["error"] or p["repair"]]
    notes += [f"  {p['part']}: warning: {w}" for p in report["parts"] for w in p["warnings"]]
    notes += [f"  {p['part']}: time: {p['latency']['profile']['why']}" for p in report["parts"]
              if (p["latency"] or {}).get("profile")]
    notes += [f"  {p['part']}: target {p['target']['status'].upper()}: {p['target']['reason']}"
              for p in report["parts"] if p["target"] and p["target"]["status"] in ("fail", "skipped", "partial")]
    devices = device_table(report)
    return "\n".join([title, table(rows, header), *notes, *(["", devices] if devices else [])])


def latency_cells(latency: dict[str, Any] | None) -> list[str]:
    """p50 ms and the speed-up over eager fp32, for the tables."""
    if not latency:
        return ["-", "-"]
    return [f"{latency['p50_ms']:.3g}", f"{latency['speedup']:.2f}x"]


def target_cell(target: dict[str, Any] | None) -> str:
    """The target's verdict in a table cell: `PASS 3/3`, `FAIL 1/2`, `PARTIAL 1/2`, `-`."""
    if not target or target["status"] == "n/a":
        return "-"
    devices = [d for d in target["devices"].values() if d["status"] != "n/a"]
    passed = sum(d["status"] == "pass" for d in devices)
    return f"{target['status'].upper()} {passed}/{len(devices)}"


def device_cell(device: dict[str, Any] | None) -> str:
    """One device's verdict in a cell: `PASS 1.2e-06 top-1 100%`, `SKIPPED`, `-`."""
    if not device or device["status"] == "n/a":
        return "-"
    if device["status"] == "skipped":
        return "SKIPPED"
    if device["max_abs"] is None:
        return device["status"].upper()
    top1 = f" top-1 {device['top1_agreement']:.1%}" if device.get("top1_agreement") is not None else ""
    latency = f" {device['p50_ms']:.3g} ms" if device.get("p50_ms") is not None else ""
    return f"{device['status'].upper()} {device['max_abs']:.2g}{top1}{latency}"


def device_table(report: dict[str, Any]) -> str:
    """Each part's devices: how each ran here, its verdict, max abs / cosine / top-1 against eager."""
    header = ["part", "device", "ran", "verdict", "max abs", "cosine", "top-1", "cpu features", "runtime"]
    rows = [[part["part"], name, d["mode"] or "-", device_cell(d).split(" ")[0],
             f"{d['max_abs']:.2e}" if d["max_abs"] is not None else "-",
             f"{d['cosine']:.6f}" if d["cosine"] is not None else "-",
             f"{d['top1_agreement']:.2%}" if d["top1_agreement"] is not None else "-",
             " ".join(d["cpu_flags"]) or "-", d["runtime"] or d["reason"] or "-"]
            for part in report["parts"] if part["target"] for name, d in part["target"]["devices"].items()]
    return table(rows, header) if rows else ""


def _relative(path: str | None, base: str) -> str:
    if not path:
        return "-"
    try:
        return str(Path(path).resolve().relative_to(Path(base).resolve()))
    except ValueError:
        return path
