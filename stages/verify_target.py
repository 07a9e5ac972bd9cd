"""verify_target: the artifact on every device its target ships to (conf/target/*.yaml `devices:`),
each in its own runtime: natively where this host is one, under qemu-user where it is not
(an arm64 phone core, x86 without VNNI), in Chromium for a browser; on verify's held-out inputs
and, for a part with state, verify's stream with the state carried as the app carries it; for a
decoder, verify's greedy generations, the device choosing each token; judged by the same
tolerances. The cell passes only when no device fails; a device that cannot run here is SKIPPED
with its reason, never passed silently. Emulated time is not device time: only the
browser's latency is reported.
"""
from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from pipelines.registry import StageContext, stage

from .formats import format_code
from .support.fidelity import HELD_OUT, class_scores, judge, load_held_out, part_tolerance, verdict
from .support.tensors import batches


def _placements(view) -> list:
    from .runtimes.devices import place

    return [place(device, view["format"]["name"], view["verify"]["emulate"]) for device in view["target"]["devices"]]


def _environment(view) -> dict[str, Any]:
    from .runtimes.devices import environment

    return environment(view["target"]["devices"], view["format"]["name"], view["verify"]["emulate"])


NEEDS = ("load_checkpoint", "clean_state_dict", "quantize", "lower", "verify")  # the last two to run; all to diagnose


@stage("verify_target", needs=lambda view: NEEDS if any(p.mode != "n/a" for p in _placements(view)) else (),
       config=("target", "format", "precision", "part", "verify.batch_size", "verify.emulate", "verify.diagnose",
               "benchmark", "model.arch", "model.factory"),
       code=format_code,
       environment=_environment, artifacts=("verify_target.json",))
def run(ctx: StageContext) -> dict:
    placements = _placements(ctx.cfg)
    devices = {p.device: ({"status": p.mode, "passed": True, "reason": p.reason} if not p.runs else
                          _on_device(ctx, p)) for p in placements}
    report = _verdict(ctx.cfg.target.name, devices)
    (ctx.workdir / "verify_target.json").write_text(json.dumps(report, indent=1))
    return {**report, "summary": f"{report['status'].upper()}: {report['reason']}"}


def _verdict(target: str, devices: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The target's verdict: FAIL when a device fails, PASS when every device that takes the
    format passed, PARTIAL when some were skipped; the reason names the devices."""
    failed = [name for name, d in devices.items() if d["status"] == "fail"]
    skipped = [name for name, d in devices.items() if d["status"] == "skipped"]
    passed = [name for name, d in devices.items() if d["status"] == "pass"]
    if failed:
        status, reason = "fail", "; ".join(f"{name}: {devices[name]['reason']}" for name in failed)
    elif not passed and not skipped:
        status, reason = "n/a", f"no device of the {target} target takes this format"
    elif skipped:
        status = "partial" if passed else "skipped"
        reason = "; ".join([*(f"{name} PASS" for name in passed),
                            *(f"{name} SKIPPED ({devices[name]['reason']})" for name in skipped)])
    else:
        status, reason = "pass", ", ".join(f"{name} {_figure(devices[name])}" for name in passed)
    return {"status": status, "passed": not failed, "reason": reason, "target": target, "devices": devices}


def _figure(device: dict[str, Any]) -> str:
    worst = max(o["max_abs"] for o in device["outputs"].values())
    generated = device.get("generation")
    return f"max abs {worst:.2g}" + (f", {_generation_figure(generated)}" if generated else "")


def _on_device(ctx: StageContext, placement) -> dict[str, Any]:
    """One device's verdict on the held-out inputs (and the stream, for a part with state)."""
    from .runtimes.emulated import DeviceError
    from .runtimes.browser import BrowserUnavailable

    verify, lower = ctx.input("verify"), ctx.input("lower")
    if placement.mode == "native" and verify.result.get("host_kernels"):
        return _verify_was_native(verify.result)
    io = json.loads((lower.dir / "io.json").read_text())
    tolerance = part_tolerance(ctx.cfg.precision, ctx.cfg.part)
    started = time.monotonic()
    ctx.log.info("    verify_target: %s (%s)", placement.device, placement.mode)
    try:
        with placement.session(lower.dir / lower.result["artifact"], io, ctx.cfg.benchmark.threads) as session:
            report, first = _held_out(ctx, verify.dir, io, session) if "held_out" in verify.result else ({}, None)
            if io["state"] or io["internal_state"]:
                report = _stream(verify.dir, io, session, tolerance, report)
            if ctx.cfg.part.generate is not None:
                report["generation"] = _generation(ctx, verify, lower, io, placement, session, tolerance)
            if placement.mode == "browser":
                report["latency"] = _latency(ctx, first[0] if "processing" in io else None, io, session)
            described = session.describe()
            cpu = getattr(session, "cpu", None)
    except (DeviceError, BrowserUnavailable) as exc:
        return {"status": "fail", "passed": False, "mode": placement.mode,
                "reason": f"the runtime failed on {lower.result['artifact']}: {exc}"}
    passed, reason = verdict(report, tolerance)
    mode = ctx.cfg.verify.diagnose
    if first and "processing" not in io and not io["state"] and (mode == "always" or mode == "on_failure" and not passed):
        from .support.diagnose import describe

        report["diagnosis"] = _diagnosis(ctx, placement, *first)
        if not passed:
            reason += f"; {describe(report['diagnosis'])}"
    worst = max(o["max_abs"] for o in report["outputs"].values())
    return {"status": "pass" if passed else "fail", "passed": passed, "mode": placement.mode,
            "runtime": described, **({"cpu": cpu} if cpu else {}),
            "reason": reason or f"max abs {worst:.2e} against eager", **report,
            "seconds": round(time.monotonic() - started, 2)}


def _verify_was_native(verify: dict[str, Any]) -> dict[str, Any]:
    """The host is the device and verify ran the artifact in its runtime with this host's own
    kernels, on the same inputs and tolerances: verify's figures are the device's."""
    from pipelines.versions import host_cpu

    from .runtimes.device_worker import cpu_features

    keys = ("held_out", "examples", "outputs", "scores", "top1_agreement", "map_iou", "boxes", "accuracy", "stream",
            "generation", "diagnosis")
    return {"status": "pass" if verify["passed"] else "fail", "passed": verify["passed"], "mode": "native",
            "runtime": f"{verify['runtime']}, native ({host_cpu()['model']}): verify's own run",
            "cpu": cpu_features(), "reason": verify["reason"] or "verify's figures, on this host",
            **{k: verify[k] for k in keys if k in verify}, "seconds": 0.0}


def _diagnosis(ctx: StageContext, placement, feed, outputs) -> dict[str, Any]:
    """Where the device departs: quantize's program layer by layer, its prefixes bisected in
    the device's own runtime (stages/support/diagnose.py)."""
    import contextlib

    from .support.diagnose import diagnose_program
    from .support.model_builder import load_part

    ctx.log.info("    verify_target: tracing %s's error to its layers", placement.device)
    clean = ctx.input("clean_state_dict")
    eager = load_part(ctx.cfg.model, ctx.cfg.part, clean.dir / clean.result["weights"],
                      ctx.input("load_checkpoint").result["config"], strict=clean.result["strict"])
    with contextlib.ExitStack() as sessions:
        def runner(artifact, io):
            return sessions.enter_context(placement.session(artifact, io, ctx.cfg.benchmark.threads)).run

        return diagnose_program(ctx, eager, feed, outputs, runner)


def _held_out(ctx: StageContext, verify_dir, io, session) -> tuple[dict[str, Any], dict]:
    """The device's outputs on verify's held-out inputs, judged; and the first feed with them."""
    if "processing" in io:  # verify kept the feeds after the app's own steps, and eager's outputs
        from .support.raw import HELD_OUT_RAW, judge_raw, load_held_out as load_raw

        feeds, eager_outputs, labels = load_raw(verify_dir / HELD_OUT_RAW)
        actual = session.run_many(feeds)
        return ({"held_out": "verify's", **judge_raw(eager_outputs, [dict(zip(io["outputs"], a)) for a in actual],
                                                     labels)}, (feeds[0], actual[0]))
    examples, eager, labels = load_held_out(verify_dir / HELD_OUT)
    feeds = list(batches(examples, io["inputs"], ctx.cfg.verify.batch_size))
    actual = session.run_many(feeds)
    return {"held_out": "verify's", **judge(
        [[eager[name] for name in io["outputs"]]],
        [[np.concatenate([a[i] for a in actual]) for i in range(len(io["outputs"]))]],
        io["outputs"], class_scores(ctx.cfg.part, io), labels, boxes=ctx.cfg.part.boxes)}, (feeds[0], actual[0])


def _stream(verify_dir, io, session, tolerance, report: dict[str, Any]) -> dict[str, Any]:
    """verify's stream on the device: a fresh session, state carried call by call."""
    from .support.streaming import STREAM, carry, judge_stream, load_stream

    chunks, expected = load_stream(verify_dir / STREAM)
    actual = [out for _, out in carry(session.run, io, chunks)]
    stream = judge_stream(expected, actual, list(expected[0]), tolerance)
    report["stream"] = stream
    report.setdefault("outputs", stream["outputs"])
    return report


def _generation(ctx: StageContext, verify, lower, io, placement, session, tolerance) -> dict[str, Any]:
    """verify's greedy generations replayed on the device: the same prompts, the device's own
    choices fed back, its tokens against eager's. A .pte keeping its state inside starts each
    prompt in a fresh session (as verify reloads it); state as I/O starts from zeros."""
    import contextlib

    from .support.generation import GENERATION, judge_generation, load_generation

    inside = not io["state"] and bool(io["internal_state"])
    with contextlib.ExitStack() as fresh:
        def artifact():
            if not inside:
                return session.run
            return fresh.enter_context(placement.session(lower.dir / lower.result["artifact"], io,
                                                         ctx.cfg.benchmark.threads)).run

        return judge_generation(ctx.cfg.part.generate, tolerance, load_generation(verify.dir / GENERATION),
                                artifact, io, verify.result["generation"]["state_bytes"])


def _generation_figure(generated: dict[str, Any]) -> str:
    return f"{generated['token_match']:.0%} of {generated['prompts']}x{generated['steps']} greedy tokens as eager's"


def _latency(ctx: StageContext, raw_feed: dict | None, io, session) -> dict[str, Any]:
    """The browser's latency at batch 1 (a raw artifact: on its first raw input)."""
    from .support import timing

    cfg = ctx.cfg.benchmark
    with timing.exclusive():
        example = raw_feed if raw_feed is not None else timing.batch_of_one(io["inputs"])
        return timing.summary(session.latency(example, cfg.warmup, max(cfg.min_runs, 1)))
