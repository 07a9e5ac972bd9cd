"""The precisions ExecuTorch (.pte) builds, on the ExportedProgram before lowering
(stages/formats/schemes.py: the registry; torch is imported inside each)."""
from __future__ import annotations

from pipelines.digests import link_or_copy

from . import Job
from .int4 import Int4Options, nothing_quantized
from .schemes import scheme

PROGRAM = "program.pt2"


@scheme("pte", "fp32")
def fp32(job: Job) -> str:
    link_or_copy(job.source / PROGRAM, job.workdir / PROGRAM)
    return "none"


@scheme("pte", "fp16")
def fp16(job: Job) -> str:
    import torch

    from ..upstream.executorch import FP16_UNSAFE_OPS
    from .fx_graph import reexport, to_half, within

    keep = list(job.quantize.keep_float)
    module = to_half(torch.export.load(job.source / PROGRAM).module(),
                     lambda node: node.target in FP16_UNSAFE_OPS or within(node, keep))
    reexport(module, job.io["inputs"], job.workdir / PROGRAM)
    return "half-precision weights, fp32 I/O, LayerNorm in fp32"


@scheme("pte", "int8", calibrated=True)
def int8(job: Job) -> str:
    return _pt2e(job, dynamic=False)


@scheme("pte", "int8_dynamic", calibrated=True)  # traces one calibration batch
def int8_dynamic(job: Job) -> str:
    return _pt2e(job, dynamic=True)


def _pt2e(job: Job, dynamic: bool) -> str:
    import torch

    from .fx_graph import reexport
    from .pt2e import quantized
    from .torchao_weights import int8_tables

    module = quantized(torch.export.load(job.source / PROGRAM), job, dynamic)
    tables = int8_tables(module, list(job.quantize.keep_float)).embeddings
    reexport(module, job.io["inputs"], job.workdir / PROGRAM)
    return (f"PT2E XNNPACKQuantizer {'dynamic' if dynamic else 'static'} "
            f"{'per-channel' if job.quantize.per_channel else 'per-tensor'}"
            + (f", {len(tables)} embedding tables int8 (torchao)" if tables else ""))


@scheme("pte", "int4", options=Int4Options)
def int4(job: Job) -> str:
    import torch

    from .fx_graph import reexport
    from .torchao_weights import int4_weights

    options: Int4Options = job.options
    module = torch.export.load(job.source / PROGRAM).module()
    done = int4_weights(module, options, list(job.quantize.keep_float))
    if not done.linear + done.embeddings:
        raise nothing_quantized(options, done.narrow)
    reexport(module, job.io["inputs"], job.workdir / PROGRAM)
    return (f"torchao 8-bit dynamic activations, 4-bit weights in groups of {options.group_size} "
            f"({len(done.linear)} Linear" + (f", {len(done.embeddings)} embedding tables" if done.embeddings else "")
            + ")" + (f", float where the width is not a multiple of {options.group_size}: "
                     f"{', '.join(done.narrow)}" if done.narrow else ""))
