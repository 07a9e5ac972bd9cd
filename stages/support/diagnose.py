"""Which layer breaks: an artifact's error traced to module paths (`blocks.0.norm`, not `node_17`).

Two passes on one held-out batch:
1. the quantized program as a trusted evaluator computes it (PyTorch for a .pte's program,
   onnxruntime without graph optimisation for an .onnx), every module's output compared with
   eager PyTorch's: the layers whose relative error jumps are where precision is lost;
2. when the runtime's outputs are worse than that program's own (a kernel, a fusion), a
   bisection over prefixes of the program built and run as the artifact is finds the first
   module where the runtime leaves the program's arithmetic.
"""
from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from ..formats import Job
from .model_builder import as_step

FLOOR = 1e-3  # relative errors below this are noise, never a jump
JUMP = 2.0  # a layer is a suspect when its error is this many times the worst before it
SUSPECTS = 5


def relative(actual: np.ndarray, expected: np.ndarray) -> float:
    """||actual - expected|| / ||expected|| in float64 (inf when the shapes differ)."""
    a, e = np.asarray(actual, np.float64).ravel(), np.asarray(expected, np.float64).ravel()
    if a.shape != e.shape:
        return float("inf")
    return float(np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-12))


Runner = Callable[[Path, dict[str, Any]], Callable[[dict[str, np.ndarray]], list[np.ndarray]]]


def diagnose(part: torch.nn.Module, backend, job: Job, feed: dict[str, np.ndarray],
             runtime_outputs: list[np.ndarray], runner: Runner | None = None) -> dict[str, Any]:
    """Per-module errors of the artifact's program, its suspects, and where its runtime diverges;
    `runner(artifact, io) -> fn(feed) -> outputs` runs the prefixes where the artifact ran (a
    device's runtime; by default the host's, backend.load)."""
    eager_outputs, eager_points = eager_modules(part, job.io["inputs"], feed)
    if not eager_points:
        return {"layers": [], "suspects": [], "note": "the part has no sub-modules to compare"}
    run, types = backend.reference(job)
    reference_outputs, reference_points, next_reads = run(feed)
    layers = [{"module": path, "type": types.get(path, "?"), **_compare(reference_points[path], expected)}
              for path, expected in eager_points.items()
              if path in reference_points and reference_points[path].shape == expected.shape]
    report: dict[str, Any] = {
        "batch": len(next(iter(feed.values()))),
        "reference_error": _worst(reference_outputs, eager_outputs),
        "runtime_error": _worst(runtime_outputs, eager_outputs),
        "layers": layers, "suspects": jumps(layers)}
    divergence = _worst(runtime_outputs, reference_outputs)
    if layers and divergence > max(FLOOR, report["reference_error"]):
        at = _first_divergence(backend, job, feed, layers, next_reads, divergence / 4,
                               runner or (lambda path, io: backend.load(path, io)))
        report["runtime_diverges_at"] = at
        if at.get("module"):
            report["suspects"] = [at] + [s for s in report["suspects"] if s["module"] != at["module"]]
    return report


def diagnose_program(ctx, eager: torch.nn.Module, feed: dict[str, np.ndarray], outputs: list[np.ndarray],
                     runner: Runner | None = None) -> dict[str, Any]:
    """diagnose() for a stage whose inputs hold quantize's program: its per-layer errors on
    `feed` and, where `outputs` (the artifact's, where it ran) leave it, the first module there."""
    import json

    from ..formats import Job, backend

    quantized = ctx.input("quantize")
    io = json.loads((quantized.dir / "io.json").read_text())
    job = Job(quantized.dir, io, ctx.cfg.precision.name, ctx.cfg.format, None, None, ctx.workdir)
    return diagnose(eager, backend(ctx.cfg.format.name), job, feed, outputs, runner)


def eager_modules(part: torch.nn.Module, specs: list[Mapping[str, Any]], feed: dict[str, np.ndarray]
                  ) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """Eager outputs and each sub-module's output (first call, in completion order; modules
    called more than once are left out: their output has no one meaning)."""
    model = getattr(part, "model", part)
    seen: dict[str, np.ndarray] = {}
    calls: Counter[str] = Counter()
    hooks = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(_module, _args, output, name=name):
            calls[name] += 1
            if isinstance(output, torch.Tensor) and output.is_floating_point() and name not in seen:
                seen[name] = output.detach().float().numpy().copy()

        hooks.append(module.register_forward_hook(hook))
    try:
        outputs = as_step(part, specs)(feed)
    finally:
        for handle in hooks:
            handle.remove()
    return outputs, {name: value for name, value in seen.items() if calls[name] == 1}


def jumps(layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Layers whose error is JUMP times the worst error before them, largest rise first."""
    found, before = [], FLOOR
    for layer in layers:
        if layer["error"] > JUMP * before:
            found.append({"module": layer["module"], "type": layer["type"], "error": layer["error"],
                          "before": before, "why": "precision lost here: relative error "
                          f"{_percent(before)} before it, {_percent(layer['error'])} after"})
        before = max(before, layer["error"])
    return sorted(found, key=lambda s: s["before"] - s["error"])[:SUSPECTS]


def describe(report: Mapping[str, Any]) -> str:
    """One line for the console: where the error comes from."""
    suspects = report.get("suspects") or []
    if not suspects:
        return report.get("note") or "no layer stands out: the error builds up across the model"
    first = suspects[0]
    text = f"{first['module']} ({first['type']}): {first['why']}"
    return text + (f"; then {', '.join(s['module'] for s in suspects[1:3])}" if len(suspects) > 1 else "")


def _first_divergence(backend, job: Job, feed, layers, reference_points, threshold: float,
                      runner: Runner) -> dict[str, Any]:
    """Bisect the modules (in order) for the first whose runtime prefix leaves the program's
    arithmetic by more than threshold; each step builds and runs one prefix artifact."""
    modules = [layer["module"] for layer in layers]
    types = {layer["module"]: layer["type"] for layer in layers}
    errors: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="diagnose-") as tmp:
        probe = Job(job.source, job.io, job.precision, job.fmt, None, None, Path(tmp), job.target)

        def diverges(index: int) -> bool:
            module = modules[index]
            if module not in errors:
                path = backend.prefix_artifact(probe, module)
                output = runner(path, {"inputs": job.io["inputs"], "outputs": ["prefix"]})(feed)[0]
                errors[module] = relative(np.asarray(output, np.float32), reference_points[module])
            return errors[module] > threshold

        low, high = 0, len(modules) - 1
        try:
            if not diverges(high):
                return {"module": None, "probes": len(errors),
                        "why": f"the runtime matches the program up to {modules[high]}: it diverges after it"}
            while low < high:
                middle = (low + high) // 2
                low, high = (low, middle) if diverges(middle) else (middle + 1, high)
        except Exception as exc:  # a prefix the format cannot build: report what was learnt
            return {"module": None, "probes": len(errors), "why": f"bisection stopped: {type(exc).__name__}: {exc}"}
    module = modules[low]
    return {"module": module, "type": types[module], "error": errors[module], "probes": len(errors),
            "why": f"the runtime's kernels leave the program's arithmetic here (relative "
                   f"{_percent(errors[module])} at its output)"}


def _compare(actual: np.ndarray, expected: np.ndarray) -> dict[str, float]:
    a, e = actual.astype(np.float64).ravel(), expected.astype(np.float64).ravel()
    norm = np.linalg.norm(a) * np.linalg.norm(e)
    return {"error": relative(actual, expected), "max_abs": float(np.abs(a - e).max(initial=0.0)),
            "cosine": float(a @ e / norm) if norm > 0 else float(np.array_equal(a, e))}


def _worst(actual: list[np.ndarray], expected: list[np.ndarray]) -> float:
    return max((relative(a, e) for a, e in zip(actual, expected)), default=0.0)


def _percent(value: float) -> str:
    return f"{value:.2%}" if value < 10 else f"{value:.3g}x"

