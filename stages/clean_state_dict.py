"""clean_state_dict: make the checkpoint's keys fit the architecture, and report every key.

A saved ExportedProgram carries its own weights and graph: it passes through untouched.
"""
from __future__ import annotations

import json

from pipelines.errors import PipelineError
from pipelines.registry import StageContext, plain, stage


@stage("clean_state_dict", needs=("load_checkpoint",),
       config=("model.clean", "model.arch", "model.factory"),
       artifacts=("key_report.json",))
def run(ctx: StageContext) -> dict:
    import torch

    from .support.model_builder import expected_state
    from .support.state_dict_cleaning import CleanOptions, KeysDoNotFit, clean_state_dict

    loaded = ctx.input("load_checkpoint")
    if loaded.result["has_program"]:
        return _program_passes_through(ctx, loaded)
    if loaded.result["kind"] == "torchscript" and not (ctx.cfg.model.arch or ctx.cfg.model.factory):
        raise PipelineError("the checkpoint is a TorchScript archive and the model entry names no "
                            "architecture for its weights",
                            fix="export its own graph: model=graph model.checkpoint=<file> "
                                "'model.inputs=[[<its input shape>]]' (torch's TS2EPConverter), or set "
                                "model.arch._target_ (with its arguments) to the model's class")
    expected = expected_state(ctx.cfg.model, loaded.result["config"])
    state, source = _weights(loaded, expected)
    ema_path = loaded.dir / "ema_state_dict.pt"
    ema = torch.load(ema_path, map_location="cpu", weights_only=True, mmap=True) if ema_path.exists() else None
    options = CleanOptions(**{k: v for k, v in plain(ctx.cfg.model.clean).items()})
    try:
        cleaned, report = clean_state_dict(state, expected, options, ema_state_dict=ema)
    except KeysDoNotFit as exc:  # the runner keeps a failed stage's artifacts in the run dir
        _write_report(ctx, {"weights": source, **exc.report})
        if source.get("candidates"):
            exc.fix += "; or name the entry holding the weights with model.weights_key= (candidates in key_report.json)"
        raise
    torch.save(cleaned, ctx.workdir / "state_dict.pt")
    report = {"weights": source, **report}
    _write_report(ctx, report)
    rules = ", ".join(f"{rule['rule']}: {rule['count']} keys" for rule in report["applied"]) or "no renames"
    return {
        "weights": "state_dict.pt",
        "matched": report["matched"],
        "missing": len(report["missing"]),
        "unexpected": len(report["unexpected"]),
        "strict": options.strict,
        "applied": report["applied"],
        "weights_path": source["path"],
        "summary": f"{report['matched']} keys matched ({rules})" + (f", weights from '{source['path']}'"
                                                                    if source.get("candidates") else ""),
    }


def _weights(loaded, expected) -> tuple[dict, dict]:
    """The checkpoint's weights, and where they came from. Of several candidate dicts (no known key
    named one), the one that provides the most of the architecture's keys with the right shapes."""
    import torch

    from .support.state_dict_cleaning import fit

    def read(name: str) -> dict:
        return torch.load(loaded.dir / name, map_location="cpu", weights_only=True, mmap=True)

    candidates = loaded.result.get("candidates") or []
    if not candidates:
        return read("state_dict.pt"), {"path": loaded.result.get("weights_path", ""), "chosen_by": "the file's layout"}
    scored = []
    for candidate in candidates:
        tensors = read(candidate["file"])
        scored.append(({**candidate, "fits": fit(tensors, expected)}, tensors))
    best, state = max(scored, key=lambda pair: (pair[0]["fits"], pair[0]["tensors"]))
    listed = [{k: v for k, v in c.items() if k != "file"} for c, _ in scored]
    return state, {"path": best["path"], "candidates": listed,
                   "chosen_by": f"best fit to the architecture: {best['fits']}/{len(expected)} keys with their shapes"}


def _program_passes_through(ctx: StageContext, loaded) -> dict:
    """The program is the model: wrap exports it and verify runs it, no architecture needed."""
    from pipelines.digests import link_or_copy

    link_or_copy(loaded.dir / "program.pt2", ctx.workdir / "program.pt2")
    unused = "".join(f"; model.{key} not used" for key in ("arch", "factory") if ctx.cfg.model.get(key))
    note = f"ExportedProgram: its own {loaded.result['tensors']} tensors, nothing to clean{unused}"
    report = {"source": "ExportedProgram", "tensors": loaded.result["tensors"], "note": note}
    _write_report(ctx, report)
    return {"weights": "program.pt2", "matched": loaded.result["tensors"], "missing": 0,
            "unexpected": 0, "strict": True, "applied": [], "summary": note}


def _write_report(ctx: StageContext, report: dict) -> None:
    (ctx.workdir / "key_report.json").write_text(json.dumps(report, indent=1, default=str))
