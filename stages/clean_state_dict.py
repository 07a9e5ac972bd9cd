"""clean_state_dict: make the checkpoint's keys fit the architecture, and report every key."""
from __future__ import annotations

import json

from pipelines.registry import StageContext, stage


@stage("clean_state_dict", needs=("load_checkpoint",),
       config=("model.clean", "model.arch", "model.factory"),
       code=("stages.state_dict_cleaning", "stages.model_builder"), artifacts=("key_report.json",))
def run(ctx: StageContext) -> dict:
    import torch

    from .model_builder import build_model
    from .state_dict_cleaning import CleanOptions, clean_state_dict

    loaded = ctx.input("load_checkpoint")
    expected = {k: (tuple(v.shape), v.dtype)
                for k, v in build_model(ctx.cfg.model, loaded.result["config"]).state_dict().items()}
    state = torch.load(loaded.dir / "state_dict.pt", map_location="cpu", weights_only=True)
    ema_path = loaded.dir / "ema_state_dict.pt"
    ema = torch.load(ema_path, map_location="cpu", weights_only=True) if ema_path.exists() else None
    options = CleanOptions(**{k: v for k, v in _plain(ctx.cfg.model.clean).items()})
    cleaned, report = clean_state_dict(state, expected, options, ema_state_dict=ema)
    torch.save(cleaned, ctx.workdir / "state_dict.pt")
    (ctx.workdir / "key_report.json").write_text(json.dumps(report, indent=1, default=str))
    rules = ", ".join(str(rule) for rule in report.get("applied", [])) or "no renames"
    return {
        "matched": report["matched"],
        "missing": len(report["missing"]),
        "unexpected": len(report["unexpected"]),
        "strict": options.strict,
        "applied": report.get("applied", []),
        "summary": f"{report['matched']} keys matched ({rules})",
    }


def _plain(node) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True)
