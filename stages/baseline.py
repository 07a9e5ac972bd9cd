"""baseline: eager PyTorch FP32's latency at batch 1, the reference every cell's speed-up is
measured against. It depends only on the model, so a sweep measures it once per part."""
from __future__ import annotations

import json

from pipelines.registry import StageContext, stage

from .support import timing


@stage("baseline", needs=("load_checkpoint", "clean_state_dict", "wrap"),
       config=("model.arch", "model.factory", "part", "benchmark"), environment=timing.host)
def run(ctx: StageContext) -> dict:
    import torch

    from .support.model_builder import as_step, load_part

    cfg = ctx.cfg.benchmark
    if not cfg.enabled:
        return {"skipped": "benchmark.enabled=false", "summary": "not timed (benchmark.enabled=false)"}
    clean = ctx.input("clean_state_dict")
    module = load_part(ctx.cfg.model, ctx.cfg.part, clean.dir / clean.result["weights"],
                       ctx.input("load_checkpoint").result["config"], strict=clean.result["strict"])
    specs = json.loads((ctx.input("wrap").dir / "io.json").read_text())["inputs"]
    step, feed = as_step(module, specs), timing.batch_of_one(specs)
    with timing.torch_threads(cfg.threads):
        stats = timing.measure(lambda: step(feed), cfg)
    return {"runtime": f"PyTorch {torch.__version__} eager fp32", "threads": cfg.threads, **stats,
            "summary": f"eager fp32 p50 {stats['p50_ms']:.3f} ms at batch 1, {cfg.threads} thread(s)"}
