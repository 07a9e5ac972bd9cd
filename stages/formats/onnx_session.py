"""Every onnxruntime session the pipeline opens, configured in one place."""
from __future__ import annotations

import os
from pathlib import Path

from ..upstream.onnxruntime import unsafe_optimizers


def session(model, threads: int | None = None, as_written: bool = False, level: str | None = None,
            optimized: Path | None = None, external: bool = False, profile: Path | None = None):
    """Every onnxruntime session here: onnxruntime-extensions registered only when the graph uses
    its ops, the optimizers that crash on the graph switched off (stages/upstream/onnxruntime.py:
    io.json tells an app both), `threads` fixed, `as_written` without fused int8 kernels (the
    numbers any runtime computing the graph exactly gives, as onnxruntime-web's wasm does),
    `level` a GraphOptimizationLevel name, `optimized` where to write the optimized graph (its
    weights to <optimized>.data when `external`), `profile` the prefix of onnxruntime's profiler
    trace (per-node kernel times). `model`: a path or a ModelProto. Without `threads`, the run's
    OMP_NUM_THREADS where set (a sweep job's share of the cores), else onnxruntime's default."""
    import onnx
    import onnxruntime as ort

    from ..processing import uses_custom_ops

    proto = onnx.load(str(model), load_external_data=False) if isinstance(model, (str, Path)) else model
    custom_ops, disabled = uses_custom_ops(proto), unsafe_optimizers(proto)
    source = str(model) if isinstance(model, (str, Path)) else proto.SerializeToString()
    del proto  # a graph's inline weights, held once: by the session, not also by this copy
    options = ort.SessionOptions()
    threads = threads or _run_threads()
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    if as_written:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    if level:
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    if optimized:
        options.optimized_model_filepath = str(optimized)
    if optimized and external:
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         optimized.name + ".data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                         "1024")
    if profile:
        options.enable_profiling, options.profile_file_prefix = True, str(profile)
    if custom_ops:
        from onnxruntime_extensions import get_library_path

        options.register_custom_ops_library(get_library_path())
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=disabled)


def _run_threads() -> int:
    """OMP_NUM_THREADS's count (its outermost level), 0 when it is unset or no number."""
    value = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(value) if value.isdigit() else 0
