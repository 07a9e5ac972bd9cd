"""torch 2.13: TorchScript's parameters lifted as buffers that require grad by TS2EPConverter."""
from __future__ import annotations

import torch


def without_grad(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """The program's weights as leaves that need no gradient, a buffer that requires grad made
    the parameter it was (in place). Upstream, torch 2.13: given a TorchScript archive loaded by
    torch.jit.load, TS2EPConverter retraces its parameters as plain attributes, lifted as
    buffers that require grad (torch/_export/converter.py, retrace_as_exported_program); such a buffer, saved, is loaded
    by torch/export/pt2_archive/_package.py `_load_state_dict` as an `as_strided` view of a
    tensor that requires grad (parameters there are re-wrapped, buffers are not): a non-leaf
    that refuses the copy.deepcopy of ExecuTorch's lowering ("Only Tensors created explicitly
    by the user (graph leaves) support the deepcopy protocol"), and a weight PT2E and XNNPACK
    do not see as one (an INT8 .pte then keeps it float)."""
    from torch.export.graph_signature import InputKind

    for spec in program.graph_signature.input_specs:
        tensor = program.state_dict.get(spec.target)
        if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
            if spec.kind == InputKind.BUFFER:
                spec.kind, spec.persistent = InputKind.PARAMETER, None
            program.state_dict[spec.target] = torch.nn.Parameter(tensor.detach(), requires_grad=False)
    return program
