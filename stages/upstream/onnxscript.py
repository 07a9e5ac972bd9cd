"""onnxscript 0.7.2: what torch.onnx's exporter asks of it on every export."""
from __future__ import annotations

import functools


def cache_torchlib_ops() -> None:
    """Build torchlib's operator list once per process, not once per export.

    torch 2.13's exporter builds its registry on every `torch.onnx.export`
    (torch/onnx/_internal/exporter/_compat.py:149, `ONNXRegistry.from_torchlib`), which calls
    onnxscript's `get_torchlib_ops` (onnxscript/_framework_apis/torch_2_5.py:115, re-exported by
    torch_2_11.py, the module torch imports); that reads `function_ir` of ~500 functions, a
    property that re-parses each one's Python source (onnxscript/_internal/values.py:491,
    `TracedOnnxFunction.function_ir`):
    0.37 s an export here, 0.8 s the first. The list is the same every time (functions
    registered at import), so it is kept. The stage server calls this (stages.formats.PREPARED)
    and its children inherit the list; a process of its own builds it at its first export.
    tests/test_upstream.py shows the property still re-parses."""
    from onnxscript._framework_apis import torch_2_11

    if not isinstance(torch_2_11.get_torchlib_ops, functools._lru_cache_wrapper):
        torch_2_11.get_torchlib_ops = functools.cache(torch_2_11.get_torchlib_ops)
    torch_2_11.get_torchlib_ops()
