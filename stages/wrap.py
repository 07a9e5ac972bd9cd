"""wrap: the part as an export-ready module, exported with torch.export to an ExportedProgram."""
from __future__ import annotations

import json

from pipelines.errors import PipelineError
from pipelines.registry import StageContext, stage


@stage("wrap", needs=("load_checkpoint", "clean_state_dict"),
       config=("model.arch", "model.factory", "part", "wrap"),
       code=("stages.model_builder", "stages.tensors"), artifacts=("io.json",))
def run(ctx: StageContext) -> dict:
    import torch

    from .model_builder import dynamic_shapes, example_inputs, load_part

    part = ctx.cfg.part
    specs = list(part.inputs)
    module = load_part(ctx.cfg.model, part, ctx.input("clean_state_dict").dir / "state_dict.pt",
                       ctx.input("load_checkpoint").result["config"],
                       strict=ctx.input("clean_state_dict").result["strict"])
    example = example_inputs(specs)
    try:
        with torch.no_grad():
            program = torch.export.export(module, example, dynamic_shapes=dynamic_shapes(specs),
                                          strict=ctx.cfg.wrap.strict_export)
    except Exception as exc:
        raise PipelineError(f"torch.export could not capture part '{part.name}': "
                            f"{_export_reason(exc)}",
                            fix="check the part's input specs (shape, dtype, dynamic dims) "
                                "against what the module expects") from exc
    outputs = [spec for spec in program.graph_signature.output_specs
               if spec.kind.name == "USER_OUTPUT"]
    if len(outputs) != len(part.outputs):
        raise PipelineError(f"part '{part.name}' returns {len(outputs)} tensors but names "
                            f"{len(part.outputs)} outputs {list(part.outputs)}",
                            fix="list one output name per returned tensor in the part's outputs")
    torch.export.save(program, ctx.workdir / "program.pt2")
    io = {"inputs": [dict(s) for s in _plain(specs)], "outputs": list(part.outputs)}
    (ctx.workdir / "io.json").write_text(json.dumps(io, indent=1))
    params = sum(t.numel() for t in program.state_dict.values() if t.is_floating_point())
    return {"parameters": params, "io": io,
            "summary": f"{len(specs)} inputs -> {len(part.outputs)} outputs, {params:,} weights"}


def _plain(specs) -> list:
    from omegaconf import OmegaConf

    return [OmegaConf.to_container(s, resolve=True) for s in specs]


def _export_reason(exc: Exception) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return " / ".join(lines[:3])[:600] if lines else type(exc).__name__
