"""benchmark: the artifact's latency at batch 1 in its runtime, and its speed-up over eager
PyTorch FP32 (the baseline stage) on the same host, threads and input."""
from __future__ import annotations

import json

from pipelines.registry import StageContext, stage

from .support import timing
from .formats import backend


@stage("benchmark", needs=("lower", "baseline"), config=("format.name", "benchmark"),
       code=("stages.formats", "stages.support.tensors", "stages.support.timing"), environment=timing.host)
def run(ctx: StageContext) -> dict:
    cfg, eager = ctx.cfg.benchmark, ctx.input("baseline").result
    if not cfg.enabled:
        return {"skipped": "benchmark.enabled=false", "summary": "not timed (benchmark.enabled=false)"}
    lower = ctx.input("lower")
    io = json.loads((lower.dir / "io.json").read_text())
    fmt = backend(ctx.cfg.format.name)
    run_artifact, feed = fmt.load(lower.dir / lower.result["artifact"], io, threads=cfg.threads), \
        timing.batch_of_one(io["inputs"])
    stats = timing.measure(lambda: run_artifact(feed), cfg)
    speedup = round(eager["p50_ms"] / stats["p50_ms"], 3)
    return {"runtime": fmt.runtime(), "threads": cfg.threads, **stats,
            "eager_p50_ms": eager["p50_ms"], "speedup": speedup,
            "summary": f"p50 {stats['p50_ms']:.3f} ms, p90 {stats['p90_ms']:.3f} ms: "
                       f"{speedup:.2f}x eager fp32 ({eager['p50_ms']:.3f} ms)"}
