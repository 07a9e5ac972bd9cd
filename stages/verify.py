"""verify: run the artifact in its real runtime on held-out inputs and compare with eager PyTorch.

A part with state (buffers updated in forward, or declared state pairs) is also verified chunk by
chunk on a stream, its state carried as an app carries it (stages/streaming.py).
"""
from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from pipelines.errors import PipelineError, root_cause
from pipelines.logs import progress
from pipelines.registry import StageContext, stage

from .formats import Job, backend
from .tensors import as_examples, batch_count, batches, dataset_files, synthetic_examples


def _reads(view) -> list[str]:
    """The outside files verify reads: the part's eval data, a streamed signal file."""
    stream = view["verify"]["stream"]
    signal = [stream["file"]] if stream["signal"] == "file" and stream["file"] else []
    return dataset_files(view["part"]["eval_data"]) + signal


@stage("verify", needs=("load_checkpoint", "clean_state_dict", "wrap", "quantize", "lower"),
       config=("verify", "precision", "format", "model.arch", "model.factory", "part"),
       code=("stages.formats", "stages.model_builder", "stages.tensors", "stages.streaming",
             "stages.diagnose", "stages.upstream"),
       reads=_reads, artifacts=("verify.json",))
def run(ctx: StageContext) -> dict:
    from .model_builder import as_step, load_part

    wrap, lower = ctx.input("wrap"), ctx.input("lower")
    eager_io = json.loads((wrap.dir / "io.json").read_text())  # the module's own inputs/outputs
    io = json.loads((lower.dir / "io.json").read_text())  # the artifact's: its state may be I/O
    clean = ctx.input("clean_state_dict")
    eager = load_part(ctx.cfg.model, ctx.cfg.part, clean.dir / clean.result["weights"],
                      ctx.input("load_checkpoint").result["config"], strict=clean.result["strict"])
    artifact = backend(ctx.cfg.format.name).load(lower.dir / lower.result["artifact"], io)
    tolerance = part_tolerance(ctx.cfg.precision, ctx.cfg.part)
    step = as_step(eager, eager_io["inputs"])  # without internal state, io has the same inputs
    # a module that updates its buffers is not a function of one input: only a stream tests it
    report, first = ({}, None) if eager_io["internal_state"] else _held_out_report(ctx, io, step, artifact)
    if eager_io["state"] or eager_io["internal_state"]:
        from .streaming import verify_stream

        report["stream"] = verify_stream(ctx.cfg.verify.stream, tolerance, step, eager_io,
                                         _resetter(eager, eager_io), artifact, io)
        report.setdefault("outputs", report["stream"]["outputs"])
    report["passed"], report["reason"] = check(report, tolerance) if "held_out" in report else (True, "")
    if report["passed"] and "stream" in report:
        report["passed"], report["reason"] = report["stream"]["passed"], report["stream"]["reason"]
    mode = ctx.cfg.verify.diagnose
    if first and not io["state"] and (mode == "always" or mode == "on_failure" and not report["passed"]):
        from .diagnose import describe

        report["diagnosis"] = _diagnosis(ctx, eager, *first)
        if not report["passed"]:
            report["reason"] += f"; {describe(report['diagnosis'])}"
    (ctx.workdir / "verify.json").write_text(json.dumps(report, indent=1))
    outputs = report["outputs"].values()
    acc, stream = report.get("accuracy"), report.get("stream")
    report["summary"] = (("PASS" if report["passed"] else "FAIL")
                         + f" max_abs={max(o['max_abs'] for o in outputs):.2e}"
                         f" cos={min(o['cosine'] for o in outputs):.6f}"
                         + (f" acc {acc['eager']:.2%}->{acc['artifact']:.2%}" if acc else "")
                         + (f" | {stream['chunks']} chunks streamed: worst {stream['max_abs']:.2e},"
                            f" stateless would be {stream['stateless_baseline']['max_abs']:.2e}"
                            if stream else ""))
    return report


def _diagnosis(ctx: StageContext, eager, feed, outputs) -> dict[str, Any]:
    """Per-layer errors of quantize's program on one held-out batch (stages/diagnose.py)."""
    from .diagnose import diagnose

    quantized = ctx.input("quantize")
    io = json.loads((quantized.dir / "io.json").read_text())
    job = Job(quantized.dir, io, ctx.cfg.precision.name, ctx.cfg.format, None, None, ctx.workdir)
    ctx.log.info("    verify: tracing the error to its layers")
    return diagnose(eager, backend(ctx.cfg.format.name), job, feed, outputs)


def _held_out_report(ctx: StageContext, io, eager, artifact) -> tuple[dict[str, Any], tuple]:
    """Eager and artifact on the held-out examples, batch by batch; and the first batch with
    the artifact's outputs (for diagnosis)."""
    specs = io["inputs"]
    examples, labels, origin = _held_out(ctx, specs)
    size = ctx.cfg.verify.batch_size
    expected: list[list[np.ndarray]] = []
    actual: list[list[np.ndarray]] = []
    for batch in progress(batches(examples, specs, size), batch_count(examples, specs, size), "verify"):
        expected.append(eager(batch))
        actual.append(artifact(batch))
    joined = {name: (np.concatenate([e[i] for e in expected]), np.concatenate([a[i] for a in actual]))
              for i, name in enumerate(io["outputs"])}
    report: dict[str, Any] = {"held_out": origin, "examples": len(next(iter(examples.values()))),
                              "outputs": {name: compare(*pair) for name, pair in joined.items()}}
    agreement = {name: top1_agreement(*joined[name]) for name in class_scores(ctx.cfg.part, io)
                 if joined[name][0].ndim >= 2 and joined[name][0].shape[-1] >= 2}
    if agreement:
        report["top1_agreement"] = agreement
    if labels is not None:
        report["accuracy"] = classification(np.concatenate([e[0] for e in expected]),
                                            np.concatenate([a[0] for a in actual]), labels)
        report["accuracy"]["output"] = io["outputs"][0]
    return report, (next(batches(examples, specs, size)), actual[0])


def _resetter(module, io):
    """Puts the buffers forward updates back to their loaded values (a new stream)."""
    initial = {name: module.get_buffer(name).clone() for name in io["internal_state"]}

    def reset() -> None:
        for name, value in initial.items():
            module.get_buffer(name).copy_(value)

    return reset


def _held_out(ctx: StageContext, specs) -> tuple[dict[str, np.ndarray], np.ndarray | None, str]:
    """The part's eval data (never the calibration data), or seeded synthetic inputs."""
    data = ctx.cfg.part.eval_data
    if data:
        from hydra.utils import instantiate

        try:
            loaded = instantiate(data)
        except Exception as exc:
            raise PipelineError(f"eval_data {data['_target_']} failed: {root_cause(exc)}",
                                fix=f"it is called as {data['_target_']}(<its config keys>) and returns "
                                    '{"inputs": {input name: array}, "labels": array or absent}') from exc
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


SCORE_NAMES = re.compile(r"logit|score|prob", re.IGNORECASE)


def class_scores(part, io) -> list[str]:
    """The outputs that are scores over classes: the part's `scores`, else those named so."""
    declared = part.get("scores")
    names = list(declared) if declared is not None else [n for n in io["outputs"] if SCORE_NAMES.search(n)]
    return [n for n in names if n in io["outputs"]]


def top1_agreement(expected: np.ndarray, actual: np.ndarray) -> float:
    """How often artifact and eager pick the same class (argmax of the last dim, every position)."""
    return float((expected.argmax(-1) == actual.argmax(-1)).mean())


def classification(expected: np.ndarray, actual: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Test-set accuracy of eager and artifact, and how often their top-1 agree."""
    eager_top1 = expected.reshape(len(labels), -1).argmax(axis=1)
    artifact_top1 = actual.reshape(len(labels), -1).argmax(axis=1)
    return {"eager": float((eager_top1 == labels).mean()),
            "artifact": float((artifact_top1 == labels).mean()),
            "top1_agreement": float((eager_top1 == artifact_top1).mean())}


def part_tolerance(precision, part):
    """The precision's tolerance with the fields the part overrides at that precision."""
    from omegaconf import OmegaConf

    override = (part.get("tolerance") or {}).get(precision.name) or {}
    mine = {key: override[key] for key in override if not OmegaConf.is_missing(override, key)}
    return OmegaConf.merge(precision.tolerance, mine)


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
    agreement = dict(report.get("top1_agreement") or {})
    if acc:
        agreement.setdefault(acc["output"], acc["top1_agreement"])
    for name, value in agreement.items():
        if tol.min_top1_agreement is not None and value < tol.min_top1_agreement:
            return False, f"output '{name}' top-1 agreement with eager {value:.2%} < {tol.min_top1_agreement:.0%}"
    return True, ""
