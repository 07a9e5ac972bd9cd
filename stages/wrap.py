"""wrap: the part as an export-ready module, exported with torch.export to an ExportedProgram.

A part whose forward updates buffers is exported twice: as it is (program.pt2, the state kept
inside) and with the state lifted to inputs and outputs (state_io/program.pt2 and its io.json).
convert picks one by `wrap.state` and the format, so wrap runs once per sweep.
"""
from __future__ import annotations

import json

from pipelines.errors import PipelineError
from pipelines.registry import StageContext, plain, stage


@stage("wrap", needs=("load_checkpoint", "clean_state_dict"),
       config=("model.arch", "model.factory", "part", "wrap.strict_export"),  # wrap.state: convert
       code=("stages.support.model_builder", "stages.support.tensors", "stages.support.state_io", "stages.support.export_errors"),
       artifacts=("io.json",), libraries=("torch.export._trace",))
def run(ctx: StageContext) -> dict:
    import torch

    from .support.export_errors import capture_failure, check_dynamic_dims, check_inputs
    from .support.model_builder import dynamic_shapes, example_inputs, load_part, used_tensors
    from .support.state_io import STATE_IO, lift, mutated_buffers, refuse_rebound_buffers

    part = ctx.cfg.part
    specs = list(part.inputs)
    clean = ctx.input("clean_state_dict")
    module = load_part(ctx.cfg.model, part, clean.dir / clean.result["weights"],
                       ctx.input("load_checkpoint").result["config"], strict=clean.result["strict"])
    example = example_inputs(specs)
    before = dict(module.named_buffers())
    check_inputs(module, example, specs, part.name)
    refuse_rebound_buffers(module, before, part.name)
    try:
        with torch.no_grad():
            program = torch.export.export(module, example, dynamic_shapes=dynamic_shapes(specs),
                                          strict=ctx.cfg.wrap.strict_export)
    except Exception as exc:
        raise capture_failure(exc, module, part.name) from exc
    check_dynamic_dims(program, specs, part.name)
    outputs = [spec for spec in program.graph_signature.output_specs
               if spec.kind.name == "USER_OUTPUT"]
    if len(outputs) != len(part.outputs):
        raise PipelineError(f"part '{part.name}' returns {len(outputs)} tensors but names "
                            f"{len(part.outputs)} outputs {list(part.outputs)}",
                            fix="list one output name per returned tensor in the part's outputs")
    torch.export.save(program, ctx.workdir / "program.pt2")
    spec_dicts = [plain(spec) for spec in specs]
    buffers = mutated_buffers(program)
    io = {"inputs": spec_dicts, "outputs": list(part.outputs), "state": _declared_state(part, spec_dicts),
          "internal_state": buffers}
    _write_io(ctx.workdir, io)
    if buffers:
        lifted, state_specs, state = lift(module, buffers, spec_dicts, ctx.cfg.wrap.strict_export)
        (ctx.workdir / STATE_IO).mkdir()
        torch.export.save(lifted, ctx.workdir / STATE_IO / "program.pt2")
        _write_io(ctx.workdir / STATE_IO, {
            "inputs": spec_dicts + state_specs, "outputs": io["outputs"] + [s["output"] for s in state],
            "state": io["state"] + state, "internal_state": []})
    params = sum(t.numel() for t in used_tensors(program, leave_out=set(buffers)) if t.is_floating_point())
    (ctx.workdir / "modules.json").write_text(json.dumps(_modules(module), indent=1))
    stateful = f", state updated in forward: {len(buffers)} buffers" if buffers else ""
    return {"parameters": params, "io": io,
            "summary": f"{len(specs)} inputs -> {len(part.outputs)} outputs, {params:,} weights"
                       + stateful}


def _modules(module) -> dict[str, dict]:
    """Every sub-module of the part's model by path: its class and its weights (with its
    children's), for reports of what keeping a layer float costs."""
    model = getattr(module, "model", module)
    return {name: {"type": type(sub).__name__,
                   "parameters": sum(p.numel() for p in sub.parameters() if p.is_floating_point())}
            for name, sub in model.named_modules() if name}


def _write_io(directory, io: dict) -> None:
    (directory / "io.json").write_text(json.dumps(io, indent=1))


def _declared_state(part, specs: list[dict]) -> list[dict]:
    """The part's explicit state pairs (`state: {input: output}`) as state entries."""
    by_name = {spec["name"]: spec for spec in specs}
    state = []
    for source, target in part.get("state", {}).items():
        if source not in by_name or target not in part.outputs:
            raise PipelineError(f"part '{part.name}' declares state {source} -> {target}, but "
                                f"its inputs are {list(by_name)} and its outputs {list(part.outputs)}",
                                fix="map each state input's name to the output that updates it")
        spec = by_name[source]
        state.append({"input": source, "output": target, "shape": spec["shape"],
                      "dtype": spec["dtype"], "initial": "zeros"})
    return state
