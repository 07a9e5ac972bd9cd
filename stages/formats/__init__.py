"""Format backends: everything one deployment format knows, behind the same small interface.

Each backend module defines:
    SUFFIX                                   the deployable file's extension
    KEEPS_STATE                              whether the runtime keeps mutable buffers between
                                             calls (else a part's state must be inputs/outputs)
    convert(job) -> dict                     the wrapped program in the IR this runtime quantizes
                                             in, at fp32 (done once per format for a sweep)
    lower(job) -> dict                       the deployable file (+ program stats) in job.workdir
    runtime(as_written) -> str               the runtime load() uses, with its version
    load(artifact, io, threads, as_written)  runs the artifact in its real runtime:
                                             fn({input name: array}) -> [output arrays];
                                             as_written: the graph's own arithmetic, not fused
                                             kernels of this host that the target does not have
    inspect(artifact: Path) -> dict          weights by dtype, quantized-op counts, delegation
    reference(job) -> (Callable, types)      quantize's program run by a trusted evaluator (not
                                             the runtime's kernels): fn(feed) -> (outputs,
                                             {module: its output}, {module: its output as the
                                             next layer reads it}); types: module -> class
    prefix_artifact(job, module) -> Path     the program up to a module's output, built as the
                                             artifact is, a file in job.workdir for load()

Each precision it builds is a scheme in <format>_precisions.py (schemes.py: the registry).
Adding a format is one new module here, its precisions module, and one file in conf/format/.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import numpy as np


@dataclass
class Job:
    """What convert, quantize and lower get from their stage: inputs, config, where to write."""

    source: Path  # the upstream stage's files
    io: dict[str, Any]  # input specs and output names (wrap's io.json)
    precision: str
    fmt: Any  # the format config node
    quantize: Any  # the quantize config node (None for lower)
    calibration: Path | None  # calibration.npz (quantize at int8 only)
    workdir: Path
    target: Any = None  # the target config node (where the artifact runs), for quantize
    options: Any = None  # the precision scheme's own options (stages/formats/schemes.py), for quantize


# the libraries each format's stages import, preloaded once by the host's stage server
# (pipelines/isolation.py) so no stage pays their import: an .onnx cell never imports ExecuTorch
LIBRARIES = {
    "onnx": ("onnx", "onnxruntime", "onnxruntime.quantization", "torch.onnx._internal.exporter._compat",
             "onnxscript.function_libs.torch_lib.ops", "onnxscript.rewriter.rules.fusion",
             "stages.formats.onnx", "stages.formats.onnx_precisions"),
    "pte": ("executorch.exir", "executorch.runtime", "executorch.devtools", "torchao.quantization.pt2e.quantize_pt2e",
            "executorch.backends.xnnpack.quantizer.xnnpack_quantizer", "executorch.devtools.bundled_program.serialize",
            "executorch.extension.flat_tensor", "executorch.kernels", "stages.formats.pte", "stages.formats.pte_precisions"),
}
# work (`module:function`) the server does once for every process of a format, after its
# libraries, whose result one stage needs: that stage waits for it (`format_libraries`), the
# others do not, and every stage forked after inherits it (torchlib's operator list: 0.4 s
# that each ONNX export paid, built while wrap runs)
PREPARED = {"onnx": {"convert": "stages.upstream.onnxscript:cache_torchlib_ops"}}
# (XNNPACK's pattern graphs, 2-4 s, are not prepared: a lowering builds them only for a graph
# they can match, stages/upstream/executorch.py pattern_graphs_when_matchable; built in the
# server for every sweep, they made the cold demo sweep 17.9 s against 13.8 s without.)


def preloads(name: str) -> tuple[str, ...]:
    """What the stage server is asked to import and build for a process of the format `name`."""
    return (*LIBRARIES.get(name, ()), *PREPARED.get(name, {}).values())


def format_libraries(stage: str) -> Callable[[dict[str, Any]], tuple[str, ...]]:
    """What the stage `stage` waits for the server to have, for the view's format (`@stage(libraries=...)`):
    the format's libraries (imported there with the collector off, faster than again in the
    stage) and what it alone needs prepared."""

    def libraries(view: dict[str, Any]) -> tuple[str, ...]:
        name = view["format"]["name"]
        prepared = PREPARED.get(name, {}).get(stage)
        return (*LIBRARIES.get(name, ()), *([prepared] if prepared else []))

    return libraries


def backend(name: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.{name}")


def format_code(view: dict[str, Any]) -> tuple[str, ...]:
    """What backend() and schemes() import by name for the view's format: the code a stage that
    runs a format's backend declares (`@stage(code=format_code)`), so an edit of one format's
    backend never misses the other format's cells."""
    name = view["format"]["name"]
    return (f"{__name__}.{name}", f"{__name__}.{name}_precisions")


def calibration_batches(job: Job, size: int = 16) -> list[dict[str, np.ndarray]]:
    """The calibration inputs in order, `size` examples a batch (streaming.carry adds a lifted
    state to them)."""
    from ..support.tensors import batches

    with np.load(job.calibration) as data:
        examples = {name: data[name] for name in data.files}
    return list(batches(examples, job.io["inputs"], size))


def weight_summary(dtypes_bytes: dict[str, int], measured_on: str) -> dict[str, Any]:
    total = sum(dtypes_bytes.values()) or 1
    return {"weights_measured_on": measured_on,
            "weight_bytes_by_dtype": dict(sorted(dtypes_bytes.items())),
            "weight_share_by_dtype": {k: round(v / total, 4) for k, v in sorted(dtypes_bytes.items())}}
