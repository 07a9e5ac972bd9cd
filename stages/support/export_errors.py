"""Export failures as messages a user can act on: which input, which operator, which module.

wrap runs the part eagerly on inputs built from its specs before torch.export, so a spec that
does not fit the module (rank, dtype) is told apart from a module torch.export cannot capture
(a data-dependent branch, an operator without a fake kernel); a dim declared dynamic that the
model fixes is refused. The format backends name the operator and the module of the graph node
their exporter or lowering failed on.
"""
from __future__ import annotations

import inspect
import logging
import re
from typing import Any, Mapping

from pipelines.errors import PipelineError, first_line, root_cause

USER_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\w+)\n\s*(.*)')


def check_inputs(module, example: tuple, specs: list[Mapping[str, Any]], part: str) -> None:
    """Run the part once on the example inputs, then once with each integer input at each end of
    its synthetic range; a failure here is the specs' fault (an input of the wrong rank, token
    ids past the vocabulary), told before calibration or verification meets it. Buffers that
    forward updates (a streaming model's state) are put back as they were."""
    import torch

    buffers = {name: value.clone() for name, value in module.named_buffers()}

    def run(inputs: tuple) -> None:
        with torch.no_grad():
            module(*inputs)
            for name, value in buffers.items():
                module.get_buffer(name).copy_(value)

    try:
        run(example)
    except PipelineError:
        raise
    except Exception as exc:
        raise PipelineError(
            f"part '{part}' does not accept inputs built from its input specs "
            f"({_describe(specs, example)}): {root_cause(exc)}",
            fix="make each input spec's shape (rank), dtype and kwarg match what the module's "
                "forward expects") from exc
    for index, spec in enumerate(specs):
        if spec.get("length_of") or spec["dtype"] not in ("int64", "int32"):
            continue
        from .tensors import integer_range

        for value in integer_range(spec)[0], integer_range(spec)[1] - 1:
            inputs = (*example[:index], torch.full_like(example[index], value), *example[index + 1:])
            try:
                run(inputs)
            except Exception as exc:
                low, high = integer_range(spec)
                raise PipelineError(
                    f"part '{part}': input '{spec['name']}' draws integers in [low, high) = "
                    f"[{low}, {high}), and the model rejects {value}: {root_cause(exc)}",
                    fix=f"set the spec's low/high to the values the model takes (high is "
                        f"excluded: high = vocab_size for token ids)") from exc


def capture_failure(exc: Exception, module, part: str) -> PipelineError:
    """torch.export failed on a module that runs eagerly: say what in the module it cannot capture."""
    text = str(exc)
    frame = USER_FRAME.search(text.split("The following call raised this error:")[-1])
    where = ""
    if frame:
        path, line, function, code = frame.groups()
        owner = _module_at(module, path, int(line))
        where = f" at {path}:{line} in {owner or function}: `{code.strip()}`"
    if "data-dependent" in text:
        return PipelineError(
            f"part '{part}': torch.export cannot capture a data-dependent branch{where} "
            f"({first_line(exc)})",
            fix="replace Python control flow on tensor values with torch.where / torch.cond, or "
                "export a part that does not contain it")
    return PipelineError(
        f"part '{part}': torch.export cannot capture the module{where}: "
        f"{type(exc).__name__}: {_first_lines(text)}",
        fix="replace the operation it names (custom or unsupported operators need a fake/meta "
            "kernel), or export a part that does not contain it")


def check_dynamic_dims(program, specs: list[Mapping[str, Any]], part: str) -> None:
    """Every dim the specs declare dynamic is still dynamic in the program (export fixes a dim
    the model ties to one size, which would ship a static artifact without a word)."""
    placeholders = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
    fixed = [f"{spec['name']} dim {index} ({dim}) = {shape[int(index)]}"
             for name, spec in zip(program.graph_signature.user_inputs, specs)
             for shape in [placeholders[name].meta["val"].shape]
             for index, dim in spec["dynamic"].items() if isinstance(shape[int(index)], int)]
    if fixed:
        raise PipelineError(
            f"part '{part}': the model fixes dims its input specs declare dynamic: {', '.join(fixed)}",
            fix="drop them from the specs' `dynamic`, or remove what ties them to one size in the "
                "model (a shape used as a Python number, a reshape to constant sizes)")


TOP_LEVEL = "the part's top level"


def lowering_failure(step: str, exc: Exception, program) -> PipelineError:
    """An exporter or lowering error, with the operators it names and the modules they come from,
    else the graph node a pass was working on when it failed (its module is the error's `module`)."""
    logging.getLogger(__name__).error("%s failed", step, exc_info=exc)  # run.log only
    text = str(exc)
    cited = _named_nodes(text, program)
    module = None
    if cited:
        named = f"operator {', '.join(f'{op} (from {_module_of(node)})' for op, node in cited[:3])}: "
        from ..formats.fx_graph import module_paths

        paths = module_paths(cited[0][1])
        module = paths[-1] if paths else None
    else:
        node, module = _node_in_traceback(exc)
        named = f"{_node_text(node)} of {module or TOP_LEVEL}: " if node is not None else ""
    cause = root_cause(exc) if exc.__cause__ is not None else ""
    return PipelineError(f"{step} failed on {named}{_summary(text)}" + (f" ({cause})" if cause else ""),
                         module=module,
                         fix="replace the operator in the model, give it an implementation for "
                             "this format, or export a part that does not contain it; the full "
                             "error is in run.log")


def _node_text(node) -> str:
    op = getattr(node, "op_type", None) or _op_of(getattr(node, "target", None))
    return f"node '{node.name}' ({op})"


def _op_of(target) -> str:
    name = getattr(target, "name", None)
    return name() if callable(name) else str(target)


def quantizer_failure(exc: Exception) -> PipelineError:
    """A quantizer's own error, with the graph node (and its module) it was working on: the
    innermost frame of the traceback holding a `node` (an ONNX NodeProto or a torch.fx Node)."""
    logging.getLogger(__name__).error("quantization failed", exc_info=exc)  # run.log only
    node, module = _node_in_traceback(exc)
    where = ""
    if node is not None:
        where = f" at {_node_text(node)}" + (f" of {module}" if module else "")
    return PipelineError(f"quantization failed{where}: {root_cause(exc)}", module=module,
                         fix="keep that layer float (quantize.keep_float=[<module>], or "
                             "quantize.on_failure=mixed does it), or quantize.on_failure=fp32; "
                             "the full error is in run.log")


def _node_in_traceback(exc: BaseException) -> tuple[Any, str | None]:
    import torch

    from ..formats import fx_graph, onnx_graph

    found = None
    for frame in traceback_frames(exc):  # the innermost frame of the innermost exception wins
        candidate = frame.f_locals.get("node")
        if isinstance(candidate, torch.fx.Node) or hasattr(candidate, "op_type"):
            found = candidate
    if found is None:
        return None, None
    paths = fx_graph.module_paths(found) if isinstance(found, torch.fx.Node) else onnx_graph.module_paths(found)
    return found, (paths[-1] if paths else None)


def traceback_frames(exc: BaseException | None):
    """Every frame of an exception's traceback and of the exceptions it was raised from,
    outermost exception first, each traceback from its outer frame in."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback = exc.__traceback__
        while traceback is not None:
            yield traceback.tb_frame
            traceback = traceback.tb_next
        exc = exc.__cause__ or exc.__context__


def _named_nodes(text: str, program) -> list[tuple[str, Any]]:
    """(operator, first node) of the graph's call nodes whose operator or node name the text cites."""
    found: dict[str, Any] = {}
    for node in program.graph.nodes:
        if node.op != "call_function" or not hasattr(node.target, "name"):
            continue
        op = node.target.name()  # "namespace::name"
        cited = (op in text or op.replace("::", ".") in text or f"%{node.name} " in text)
        if cited and op not in found:
            found[op] = node
    return list(found.items())


def _module_of(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return TOP_LEVEL
    path, kind = list(stack.values())[-1]
    return f"{_user_path(str(path))} ({str(kind).rsplit('.', 1)[-1]})"


def _module_at(module, path: str, line: int) -> str | None:
    """The sub-module whose forward holds path:line, as `name (Class)`."""
    for name, sub in module.named_modules():
        forward = type(sub).forward
        try:
            source, start = inspect.getsourcelines(forward)
            same = inspect.getsourcefile(forward) == path
        except (OSError, TypeError):
            continue
        if same and start <= line < start + len(source):
            return f"{_user_path(name)} ({type(sub).__name__})"
    return None


def _user_path(path: str) -> str:
    """A module path inside the PartModule as the user names it in their model."""
    from .model_builder import PART_PREFIX

    inner = "" if path == PART_PREFIX.rstrip(".") else path.removeprefix(PART_PREFIX)
    return inner or "the model"


def _describe(specs: list[Mapping[str, Any]], example: tuple) -> str:
    """`name [spec shape] dtype`, with the shape it was traced at when a dynamic dim differs."""
    described = []
    for spec, tensor in zip(specs, example):
        traced = list(tensor.shape)
        text = f"{spec['name']} {list(spec['shape'])} {spec['dtype']}"
        text += f" (traced as {traced})" if traced != list(spec["shape"]) else ""
        described.append(text + (f" -> {spec['kwarg']}=" if spec.get("kwarg") else ""))
    return ", ".join(described)


def _first_lines(text: str, count: int = 2) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " / ".join(lines[:count])[:500] if lines else "no message"


def _summary(text: str) -> str:
    """The most telling line: an exporter's own exception summary when it has one."""
    for line in text.splitlines():
        if re.match(r"<class '[\w.]+(Dispatch|Conversion)Error'>: ", line.strip()):
            return line.split(">: ", 1)[1][:400]
    return _first_lines(text)
