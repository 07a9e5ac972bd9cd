"""verify: run the artifact in its real runtime on held-out inputs and compare with eager PyTorch."""
from __future__ import annotations

import json
from typing import Any

import numpy as np

from pipelines.logs import progress
from pipelines.registry import StageContext, stage

from .formats import backend
from .tensors import as_examples, batch_count, batches, synthetic_examples


@stage("verify", needs=("load_checkpoint", "clean_state_dict", "wrap", "lower"),
       config=("verify", "precision", "format.name", "model.arch", "model.factory", "part"),
       code=("stages.formats", "stages.model_builder", "stages.tensors"),
       artifacts=("verify.json",))
def run(ctx: StageContext) -> dict:
    import torch

    from .model_builder import load_part

    wrap, lower = ctx.input("wrap"), ctx.input("lower")
    io = json.loads((wrap.dir / "io.json").read_text())
    specs = io["inputs"]
    examples, labels, origin = _held_out(ctx, specs)
    clean = ctx.input("clean_state_dict")
    eager = load_part(ctx.cfg.model, ctx.cfg.part, clean.dir / "state_dict.pt",
                      ctx.input("load_checkpoint").result["config"], strict=clean.result["strict"])
    artifact = backend(ctx.cfg.format.name).load(lower.dir / lower.result["artifact"], io)
    size = ctx.cfg.verify.batch_size
    expected: list[list[np.ndarray]] = []
    actual: list[list[np.ndarray]] = []
    for batch in progress(batches(examples, specs, size), batch_count(examples, specs, size), "verify"):
        with torch.no_grad():
            expected.append([t.numpy() for t in eager(*(torch.from_numpy(batch[s["name"]]) for s in specs))])
        actual.append(artifact(batch))
    outputs = {name: compare(np.concatenate([e[i] for e in expected]),
                             np.concatenate([a[i] for a in actual]))
               for i, name in enumerate(io["outputs"])}
    report: dict[str, Any] = {"held_out": origin, "examples": len(next(iter(examples.values()))),
                              "outputs": outputs}
    if labels is not None:
        first = io["outputs"][0]
        report["accuracy"] = classification(np.concatenate([e[0] for e in expected]),
                                            np.concatenate([a[0] for a in actual]), labels)
        report["accuracy"]["output"] = first
    report["passed"], report["reason"] = check(report, ctx.cfg.precision.tolerance)
    (ctx.workdir / "verify.json").write_text(json.dumps(report, indent=1))
    worst = max(outputs.values(), key=lambda o: o["max_abs"])
    acc = report.get("accuracy")
    report["summary"] = (("PASS" if report["passed"] else "FAIL") + f" max_abs={worst['max_abs']:.2e}"
                         f" cos={min(o['cosine'] for o in outputs.values()):.6f}"
                         + (f" acc {acc['eager']:.2%}->{acc['artifact']:.2%}" if acc else ""))
    return report


def _held_out(ctx: StageContext, specs) -> tuple[dict[str, np.ndarray], np.ndarray | None, str]:
    """The part's eval data (never the calibration data), or seeded synthetic inputs."""
    data = ctx.cfg.part.eval_data
    if data:
        from hydra.utils import instantiate

        loaded = instantiate(data)
        return as_examples(loaded["inputs"], specs, data["_target_"]), loaded.get("labels"), data["_target_"]
    cfg = ctx.cfg.verify
    return synthetic_examples(specs, cfg.samples, cfg.seed), None, f"synthetic (seed {cfg.seed})"


def compare(expected: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    """max abs, mean abs and cosine similarity of two outputs (float64 arithmetic)."""
    e = expected.astype(np.float64).ravel()
    a = actual.astype(np.float64).ravel()
    if e.shape != a.shape:
        return {"max_abs": float("inf"), "mean_abs": float("inf"), "cosine": 0.0,
                "shape_mismatch": [list(expected.shape), list(actual.shape)]}
    diff = np.abs(e - a)
    norm = np.linalg.norm(e) * np.linalg.norm(a)
    cosine = float(e @ a / norm) if norm > 0 else float(np.array_equal(e, a))
    return {"max_abs": float(diff.max(initial=0.0)), "mean_abs": float(diff.mean()) if diff.size else 0.0,
            "cosine": cosine}


def classification(expected: np.ndarray, actual: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Test-set accuracy of eager and artifact, and how often their top-1 agree."""
    eager_top1 = expected.reshape(len(labels), -1).argmax(axis=1)
    artifact_top1 = actual.reshape(len(labels), -1).argmax(axis=1)
    return {"eager": float((eager_top1 == labels).mean()),
            "artifact": float((artifact_top1 == labels).mean()),
            "top1_agreement": float((eager_top1 == artifact_top1).mean())}


def check(report: dict[str, Any], tol) -> tuple[bool, str]:
    """Every configured tolerance, on every output; the first one missed is the reason."""
    for name, m in report["outputs"].items():
        if "shape_mismatch" in m:
            return False, f"output '{name}' has shape {m['shape_mismatch'][1]}, eager gives {m['shape_mismatch'][0]}"
        if tol.max_abs is not None and not m["max_abs"] <= tol.max_abs:
            return False, f"output '{name}' max abs error {m['max_abs']:.3g} > {tol.max_abs:g}"
        if tol.mean_abs is not None and not m["mean_abs"] <= tol.mean_abs:
            return False, f"output '{name}' mean abs error {m['mean_abs']:.3g} > {tol.mean_abs:g}"
        if tol.min_cosine is not None and not m["cosine"] >= tol.min_cosine:
            return False, f"output '{name}' cosine {m['cosine']:.6f} < {tol.min_cosine:g}"
    acc = report.get("accuracy")
    if acc and tol.max_accuracy_drop is not None:
        drop = (acc["eager"] - acc["artifact"]) * 100
        if drop > tol.max_accuracy_drop:
            return False, f"accuracy drops {drop:.2f} points > {tol.max_accuracy_drop:g}"
    if acc and tol.min_top1_agreement is not None and acc["top1_agreement"] < tol.min_top1_agreement:
        return False, f"top-1 agreement {acc['top1_agreement']:.2%} < {tol.min_top1_agreement:.0%}"
    return True, ""
