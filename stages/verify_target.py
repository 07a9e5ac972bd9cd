"""verify_target: the artifact in the runtime its target ships (onnxruntime-web's wasm in headless
Chromium for a web .onnx), on verify's held-out inputs, judged by the same tolerances; and its
latency there. Where the target runs the host's own runtime, verify's figures are the target's.
A runtime this host cannot run is SKIPPED with its reason, never passed silently.
"""
from __future__ import annotations

import importlib
import json
import time
from typing import Any

import numpy as np

from pipelines.registry import StageContext, stage
from pipelines.versions import host_isa

from .support.fidelity import HELD_OUT, check, class_scores, judge, load_held_out, part_tolerance
from .support.tensors import batches

def _runtime(view) -> str | None:
    return (view["target"].get("runtime") or {}).get(view["format"]["name"])


def _environment(view) -> dict[str, Any]:
    name = _runtime(view)
    return importlib.import_module(f"stages.runtimes.{name}").environment() if name else {"host": host_isa()}


@stage("verify_target", needs=lambda view: ("verify", "lower") if _runtime(view) else (),
       config=("target", "format.name", "precision", "part", "verify.batch_size", "benchmark"),
       code=("stages.runtimes", "stages.support.fidelity", "stages.support.tensors", "stages.support.timing",
             "stages.support.raw"),
       environment=_environment, artifacts=("verify_target.json",))
def run(ctx: StageContext) -> dict:
    target, name = ctx.cfg.target, _runtime(ctx.cfg)
    if name is None:
        host = host_isa() in list(target.isa)
        report = {"status": "n/a" if host else "skipped", "passed": True,
                  "reason": f"the {target.name} target runs the host's runtime: verify's figures are its own"
                  if host else f"the {target.name} target runs on {', '.join(target.isa)}; this host is "
                               f"{host_isa()} and has no such runtime: verify's figures are from its kernels"}
    else:
        report = _in_runtime(ctx, importlib.import_module(f"stages.runtimes.{name}"))
    (ctx.workdir / "verify_target.json").write_text(json.dumps(report, indent=1))
    return {**report, "summary": report["status"].upper() + (f" in {report['runtime']}" if "runtime" in report
                                                            else "") + f": {report.get('reason') or ''}"}


def _in_runtime(ctx: StageContext, runtime) -> dict[str, Any]:
    from .support import timing

    if reason := runtime.available():
        return {"status": "skipped", "passed": True, "reason": reason}
    verify, lower = ctx.input("verify"), ctx.input("lower")
    io = json.loads((lower.dir / "io.json").read_text())
    if io["state"] or io["internal_state"]:
        return {"status": "skipped", "passed": True,
                "reason": "a part with state is streamed on the host runtime only (verify.stream)"}
    raw = "processing" in io  # verify kept the feeds after the app's own steps, and eager's outputs
    if raw:
        from .support.raw import HELD_OUT_RAW, judge_raw, load_held_out as load_raw

        feeds, eager_outputs, labels = load_raw(verify.dir / HELD_OUT_RAW)
    else:
        examples, eager, labels = load_held_out(verify.dir / HELD_OUT)
        feeds = list(batches(examples, io["inputs"], ctx.cfg.verify.batch_size))
    started = time.monotonic()
    with runtime.session(lower.dir / lower.result["artifact"], ctx.cfg.benchmark.threads) as session:
        actual = session.run_many(feeds)
        cfg = ctx.cfg.benchmark
        with timing.exclusive():
            example = feeds[0] if raw else timing.batch_of_one(io["inputs"])
            latency = timing.summary(session.latency(example, cfg.warmup, max(cfg.min_runs, 1)))
        described = session.describe()
    if raw:
        report = judge_raw(eager_outputs, [dict(zip(io["outputs"], a)) for a in actual], labels)
    else:
        report = judge([[eager[name] for name in io["outputs"]]],
                       [[np.concatenate([a[i] for a in actual]) for i in range(len(io["outputs"]))]],
                       io["outputs"], class_scores(ctx.cfg.part, io), labels)
    passed, reason = check(report, part_tolerance(ctx.cfg.precision, ctx.cfg.part))
    worst = max(o["max_abs"] for o in report["outputs"].values())
    return {"status": "pass" if passed else "fail", "passed": passed, "runtime": described,
            "reason": reason or f"max abs {worst:.2e} against eager", **report,
            "latency": latency, "seconds": round(time.monotonic() - started, 2)}
