"""load_checkpoint: read the checkpoint file safely, whatever its layout, into plain weights."""
from __future__ import annotations

import json
from pathlib import Path

from pipelines.registry import StageContext, plain, stage


@stage("load_checkpoint", config=("model.checkpoint", "model.allow_pickle", "model.weights_key", "model.inputs"),
       reads=lambda view: [view["model"]["checkpoint"]])
def run(ctx: StageContext) -> dict:
    import torch

    from .support.checkpoint_formats import load_checkpoint_file

    path = Path(ctx.cfg.model.checkpoint)
    loaded = load_checkpoint_file(path, allow_pickle=ctx.cfg.model.allow_pickle,
                                  weights_key=ctx.cfg.model.weights_key)
    if loaded.kind == "torchscript" and ctx.cfg.model.inputs is not None:  # model=graph
        from .support.graph_files import torchscript_program

        loaded.program = torchscript_program(loaded, plain(ctx.cfg.model.inputs), path.name)
        loaded.notes.append("converted to an ExportedProgram by torch._export.converter.TS2EPConverter")
    candidates = []
    for index, (where, tensors) in enumerate(loaded.candidates.items()):
        torch.save(tensors, ctx.workdir / f"candidate_{index}.pt")
        candidates.append({"path": where, "tensors": len(tensors), "file": f"candidate_{index}.pt"})
    if not candidates and loaded.program is None:  # a program is its own weights (program.pt2)
        torch.save(loaded.state_dict, ctx.workdir / "state_dict.pt")
    if loaded.ema_state_dict is not None:
        torch.save(loaded.ema_state_dict, ctx.workdir / "ema_state_dict.pt")
    if loaded.program is not None:
        torch.export.save(loaded.program, ctx.workdir / "program.pt2")
    for note in loaded.notes:
        ctx.log.debug("load_checkpoint: %s", note)
    return {
        "kind": loaded.kind,
        "tensors": len(loaded.state_dict),
        "config": json.loads(json.dumps(loaded.config, default=str)) if loaded.config else None,
        "has_ema": loaded.ema_state_dict is not None,
        "has_program": loaded.program is not None,
        "notes": loaded.notes,
        "weights_path": loaded.weights_path,
        "candidates": candidates,
        "summary": (f"{loaded.kind}, {len(candidates)} candidate dicts of weights" if candidates
                    else f"{loaded.kind}, {len(loaded.state_dict)} tensors"
                    + (", its graph converted to an ExportedProgram" if loaded.script and loaded.program else "")),
    }
