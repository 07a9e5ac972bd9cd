"""benchmark: the artifact's latency at batch 1 in its runtime, and its speed-up over eager
PyTorch FP32 (the baseline stage) on the same host, threads and input."""
from __future__ import annotations

import json

from pipelines.registry import StageContext, stage

from .support import timing
from .formats import backend, format_code


def _needs(view) -> tuple[str, ...]:
    """A raw-input artifact is timed on a real raw example, the first verify kept."""
    return ("lower", "baseline") + (("verify",) if view["preprocess"]["mode"] == "raw" else ())


@stage("benchmark", needs=_needs, config=("format.name", "benchmark", "preprocess.mode", "part.raw"),
       code=format_code,
       environment=timing.host)
def run(ctx: StageContext) -> dict:
    cfg, eager = ctx.cfg.benchmark, ctx.input("baseline").result
    if not cfg.enabled:
        return {"skipped": "benchmark.enabled=false", "summary": "not timed (benchmark.enabled=false)"}
    lower = ctx.input("lower")
    io = json.loads((lower.dir / "io.json").read_text())
    fmt = backend(ctx.cfg.format.name)
    run_artifact = fmt.load(lower.dir / lower.result["artifact"], io, threads=cfg.threads)
    if "processing" in io:  # raw inputs: the first held-out example, after the app's own steps
        from .support.raw import HELD_OUT_RAW, load_held_out

        feed = load_held_out(ctx.input("verify").dir / HELD_OUT_RAW)[0][0]
    else:
        feed = timing.batch_of_one(io["inputs"])
    stats = timing.measure(lambda: run_artifact(feed), cfg)
    speedup = round(eager["p50_ms"] / stats["p50_ms"], 3)
    steps = _step_costs(ctx, io, cfg) if "processing" in io else {}
    profiled = cfg.profile == "always" or (cfg.profile == "slower" and speedup < 1.0)
    profile = _profile(ctx, fmt, lower, io, feed, run_artifact, speedup) if profiled else {}
    why = f"; {profile['profile']['why']}" if profile else ""
    return {"runtime": fmt.runtime(), "threads": cfg.threads, **stats, **steps, **profile,
            "eager_p50_ms": eager["p50_ms"], "speedup": speedup,
            "summary": f"p50 {stats['p50_ms']:.3f} ms, p90 {stats['p90_ms']:.3f} ms: "
                       f"{speedup:.2f}x eager fp32 ({eager['p50_ms']:.3f} ms){why}"}


def _profile(ctx: StageContext, fmt, lower, io, feed, run_artifact, speedup: float) -> dict:
    """Per-operator times in the artifact's runtime, and the cost of a new batch size."""
    from .support.profiles import explain, shape_change_cost, summarize
    from .support.tensors import batch_axes

    cfg = ctx.cfg.benchmark
    with timing.exclusive():
        events = fmt.op_times(lower.dir / lower.result["artifact"], io, feed, cfg.threads, cfg.profile_calls,
                              ctx.workdir)
        profile = summarize(events, cfg.profile_calls)
        change = shape_change_cost(run_artifact, feed, batch_axes(io["inputs"]) if "processing" not in io else None)
    if change:
        profile["shape_change"] = change
    profile["why"] = explain(profile, speedup)
    return {"profile": profile}


def _step_costs(ctx: StageContext, io, cfg) -> dict:
    """Bytes and milliseconds of each processing step on the first raw example (stages/support/raw.py)."""
    from omegaconf import OmegaConf

    from .support.raw import raw_examples, step_costs

    raw = ctx.cfg.part.raw
    specs = [OmegaConf.to_container(s, resolve=True) for s in raw.inputs]
    example = raw_examples(raw, specs, count=1)[0][0]
    where = {entry["step"]: "app" for entry in io["processing"]["in_app"]}
    return {"steps": step_costs(raw, specs, example, where, cfg)}
