"""Build the user's architecture and the export-ready module of one part.

Shared by wrap (which exports it) and verify (which runs it eagerly as the reference).
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from pipelines.errors import PipelineError, root_cause

from .tensors import export_shapes, synthetic


def import_callable(dotted: str, key: str):
    module_name, _, attr = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise PipelineError(f"{key}: cannot import '{dotted}' ({exc})",
                            fix="name an importable callable as package.module.name") from exc


def build_model(model_cfg: Mapping[str, Any], checkpoint_config: Mapping[str, Any] | None) -> nn.Module:
    """The architecture from `model.arch` (_target_ + kwargs) or `model.factory(checkpoint config)`."""
    arch, factory = model_cfg.get("arch"), model_cfg.get("factory")
    if arch:
        from hydra.utils import instantiate

        from ..upstream.torchvision import importable

        importable()  # an architecture may import it (transformers does, whenever it is installed)
        try:
            model = instantiate(arch)
        except Exception as exc:  # hydra wraps the constructor's own error
            raise PipelineError(f"model.arch: cannot build {arch.get('_target_')}: {root_cause(exc)}",
                                fix="check model.arch._target_ and its arguments") from exc
    elif factory:
        if not checkpoint_config:
            raise PipelineError(f"model.factory={factory} needs the config stored in the "
                                "checkpoint, and the checkpoint has none",
                                fix="set model.arch with _target_ and arguments instead")
        model = import_callable(factory, "model.factory")(dict(checkpoint_config))
    else:
        raise PipelineError("the model config names no architecture",
                            fix="set model.arch._target_ (with its arguments) or model.factory")
    if not isinstance(model, nn.Module):
        raise PipelineError(f"the architecture built a {type(model).__name__}, not a torch.nn.Module",
                            fix="point model.arch._target_ at an nn.Module class or factory")
    return model.eval()


PART_PREFIX = "model."  # a PartModule holds the user's model as `model`


class PartModule(nn.Module):
    """One part of a model as export sees it: positional named inputs mapped onto the module's
    (keyword) arguments, the chosen method called, outputs flattened to a tuple."""

    def __init__(self, model: nn.Module, part: Mapping[str, Any]):
        super().__init__()
        self.model = model
        self.module_path = part.get("module") or ""
        self.method = part.get("method") or "forward"
        self.kwargs = [spec.get("kwarg") for spec in part["inputs"]]
        target = self._target_module()
        if not callable(getattr(target, self.method, None)):
            raise PipelineError(f"part '{part['name']}': {type(target).__name__} has no method "
                                f"'{self.method}'", fix="set the part's method to one it has")

    def _target_module(self) -> nn.Module:
        try:
            return self.model.get_submodule(self.module_path) if self.module_path else self.model
        except AttributeError as exc:
            raise PipelineError(f"part module '{self.module_path}' is not in the model ({exc})",
                                fix="set the part's module to a dotted sub-module path") from exc

    def forward(self, *inputs: torch.Tensor):
        args = [x for x, kw in zip(inputs, self.kwargs) if not kw]
        kwargs = {kw: x for x, kw in zip(inputs, self.kwargs) if kw}
        out = getattr(self._target_module(), self.method)(*args, **kwargs)
        return tuple(_flatten(out))


def _flatten(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _flatten(item)]
    if isinstance(out, dict):
        return [t for item in out.values() for t in _flatten(item)]
    raise PipelineError(f"the model returned a {type(out).__name__}, not tensors",
                        fix="export a method that returns tensors (or tuples/dicts of them)")


def load_part(model_cfg: Mapping[str, Any], part: Mapping[str, Any], weights: Path,
              checkpoint_config: Mapping[str, Any] | None, strict: bool = True) -> PartModule:
    """The PartModule: the architecture in eval mode with the cleaned weights (a state dict),
    or a saved ExportedProgram (.pt2) as it is."""
    if weights.suffix == ".pt2":
        return PartModule(_program_module(weights, part), part)  # an exported module has no train()
    state = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
    return PartModule(with_weights(model_cfg, checkpoint_config, state, strict), part).eval()


def with_weights(model_cfg: Mapping[str, Any], checkpoint_config: Mapping[str, Any] | None,
                 state: Mapping[str, torch.Tensor], strict: bool = True) -> nn.Module:
    """The architecture holding the state dict's own tensors (memory-mapped from its file): built
    on the meta device, so no random initialisation allocates a second copy of the weights, then
    assigned. A model whose constructor computes with tensors, or makes ones the state dict does
    not hold (non-persistent buffers), is built for real first."""
    try:
        with torch.device("meta"):
            model = build_model(model_cfg, checkpoint_config)
        model.load_state_dict(state, strict=strict, assign=True)
        if not any(t.is_meta for t in (*model.parameters(), *model.buffers())):
            return model
    except PipelineError:  # the constructor cannot run on meta tensors: build it for real below
        pass
    model = build_model(model_cfg, checkpoint_config)
    model.load_state_dict(state, strict=strict, assign=True)
    return model


def expected_state(model_cfg: Mapping[str, Any], checkpoint_config: Mapping[str, Any] | None
                   ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The architecture's state dict keys with their shapes and dtypes, built without weights."""
    try:
        with torch.device("meta"):
            model = build_model(model_cfg, checkpoint_config)
    except PipelineError:
        model = build_model(model_cfg, checkpoint_config)
    return {key: (tuple(value.shape), value.dtype) for key, value in model.state_dict().items()}


def _program_module(path: Path, part: Mapping[str, Any]) -> nn.Module:
    if part.get("module") or (part.get("method") or "forward") != "forward":
        raise PipelineError(f"part '{part['name']}' selects module '{part.get('module')}' method "
                            f"'{part.get('method')}', but the checkpoint is an ExportedProgram, "
                            "which has only its forward",
                            fix="drop the part's module and method, or give a state-dict "
                                "checkpoint and model.arch to export parts of the model")
    return torch.export.load(path).module()


def used_tensors(program: torch.export.ExportedProgram, leave_out: set[str] = frozenset()) -> list[torch.Tensor]:
    """The weights, buffers and constants the program's graph uses (a part exported from a bigger
    model also holds the ones it does not use; they are not shipped), but those `leave_out` names."""
    signature = program.graph_signature
    names = {**signature.inputs_to_parameters, **signature.inputs_to_buffers,
             **signature.inputs_to_lifted_tensor_constants}
    tensors = {**program.state_dict, **program.constants}
    return [tensors[names[node.name]] for node in program.graph.nodes
            if node.op == "placeholder" and node.users and node.name in names
            and names[node.name] not in leave_out and isinstance(tensors.get(names[node.name]), torch.Tensor)]


def example_inputs(specs: list[Mapping[str, Any]], seed: int = 0,
                   exact: bool = False) -> tuple[torch.Tensor, ...]:
    """Seeded tensors of the export example shapes (of the specs' own shapes when exact)."""
    shapes = [tuple(s["shape"]) for s in specs] if exact else export_shapes(specs)
    return tuple(torch.from_numpy(a) for a in synthetic(specs, shapes, seed).values())


def dynamic_shapes(specs: list[Mapping[str, Any]]) -> tuple[dict[int, Any], ...] | None:
    """torch.export dims from the specs, each in [1, max]. Dims are hints, not hard ranges:
    export narrows a range the model cannot take whole (a conv needing 3 frames) and relates the
    dims the model ties together, where named Dims would fail; wrap then refuses any dynamic dim
    export fixed to one size."""
    shapes = [{int(index): torch.export.Dim.DYNAMIC(min=1, max=int(spec["max"]))
               for index in spec["dynamic"]} for spec in specs]
    return (tuple(shapes),) if any(shapes) else None  # one entry: PartModule.forward(*inputs)


def as_step(module: nn.Module, specs: list[Mapping[str, Any]]):
    """The module as a function {input name: array} -> [output arrays], like a loaded artifact."""

    def step(feed: Mapping[str, Any]) -> list[Any]:
        with torch.no_grad():
            return [t.numpy() for t in module(*(torch.from_numpy(feed[s["name"]]) for s in specs))]

    return step
