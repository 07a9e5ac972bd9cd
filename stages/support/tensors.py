"""Input specs to arrays: synthetic examples, batches, and export example inputs.

An *example* has exactly the spec's shape. Data sets and .npz files hold a stack of examples
(N, *shape); a plain batch (N, *shape[1:]) is also accepted and split along its first axis.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

import numpy as np

from pipelines.errors import PipelineError

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64,
                "int32": np.int32, "bool": np.bool_}


def synthetic_examples(specs: list[Mapping[str, Any]], count: int, seed: int) -> dict[str, np.ndarray]:
    """`count` seeded examples per input, stacked (count, *shape)."""
    return synthetic(specs, [tuple(spec["shape"]) for spec in specs], seed, count)


def synthetic(specs: list[Mapping[str, Any]], shapes: list[tuple[int, ...]], seed: int,
              count: int | None = None) -> dict[str, np.ndarray]:
    """Seeded values of the given shapes (stacked `count` deep when given): uniform in
    [low, high), integers in [low, high) too (high=vocab_size for token ids); a length input
    (`length_of`) in [max(low, 1), the size of the dim it measures]."""
    rng = np.random.default_rng(seed)
    by_name = {spec["name"]: shape for spec, shape in zip(specs, shapes)}
    stacks = {}
    for spec, shape in zip(specs, shapes):
        dtype = NUMPY_DTYPES[spec["dtype"]]
        size = shape if count is None else (count, *shape)
        if spec.get("length_of"):
            values = rng.integers(max(int(spec["low"]), 1), _measured(spec, by_name) + 1, size=size)
        elif np.issubdtype(dtype, np.integer):
            values = rng.integers(*integer_range(spec), size=size)
        elif dtype == np.bool_:
            values = rng.random(size) < 0.5
        else:
            values = rng.uniform(spec["low"], spec["high"], size=size)
        stacks[spec["name"]] = values.astype(dtype)
    return stacks


def integer_range(spec: Mapping[str, Any]) -> tuple[int, int]:
    """[low, high) of an integer input's synthetic values, refused when it is empty."""
    low, high = int(spec["low"]), int(spec["high"])
    if high <= low:
        raise PipelineError(f"input '{spec['name']}' ({spec['dtype']}) draws integers in "
                            f"[low, high) = [{low}, {high}), which is empty",
                            fix="set high above low (high is excluded: high = vocab_size for token ids)")
    return low, high


def _measured(spec: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> int:
    """The size of the dim a length input measures."""
    ref = spec["length_of"]
    shape = shapes.get(ref["input"])
    if shape is None or not -len(shape) <= int(ref["dim"]) < len(shape) \
            or not np.issubdtype(NUMPY_DTYPES[spec["dtype"]], np.integer):
        raise PipelineError(f"input '{spec['name']}' ({spec['dtype']}) has length_of "
                            f"{dict(ref)}, which names no dim of another input "
                            f"(inputs: { {name: list(s) for name, s in shapes.items()} })",
                            fix="give an integer input length_of: {input: <input name>, dim: <index>}")
    return shape[int(ref["dim"])]


def dataset_files(dataset: Mapping[str, Any] | None) -> list[str]:
    """The string arguments of a data callable ({_target_: fn, path: ...}): the runner hashes the
    ones that are files into the stage's key, so editing a data file recomputes the stage."""
    return [v for k, v in (dataset or {}).items() if k != "_target_" and isinstance(v, str)]


def as_examples(arrays: Mapping[str, np.ndarray], specs: list[Mapping[str, Any]],
                source: str) -> dict[str, np.ndarray]:
    """Check arrays against the specs and return them as stacks of examples (N, *shape)."""
    out = {}
    for spec in specs:
        name, shape = spec["name"], tuple(spec["shape"])
        if name not in arrays:
            raise PipelineError(f"{source} has no array named '{name}' (it has {sorted(arrays)})",
                                fix=f"name the arrays after the inputs: {[s['name'] for s in specs]}")
        array = np.asarray(arrays[name])
        if array.ndim == len(shape):  # a plain batch: split into examples along its first axis
            per = shape[0]
            if array.shape[0] % per:
                raise PipelineError(f"{source}: '{name}' has {array.shape[0]} rows, not a multiple "
                                    f"of the example batch {per}", fix="trim the array")
            array = array.reshape(-1, per, *array.shape[1:])
        if array.ndim != len(shape) + 1 or not _fits(array.shape[1:], shape, spec):
            raise PipelineError(f"{source}: '{name}' has shape {list(array.shape)}, which does "
                                f"not fit the input spec {list(shape)} (dynamic dims "
                                f"{dict(spec['dynamic'])})",
                                fix="give examples of the spec's shape, stacked along a new first axis")
        out[name] = array.astype(NUMPY_DTYPES[spec["dtype"]])
    counts = {len(a) for a in out.values()}
    if len(counts) > 1:
        raise PipelineError(f"{source}: the inputs have different example counts {sorted(counts)}",
                            fix="give every input the same number of examples")
    return out


def _fits(actual: tuple[int, ...], shape: tuple[int, ...], spec: Mapping[str, Any]) -> bool:
    dynamic = {int(d) for d in spec["dynamic"]}
    return all(a == s or d in dynamic for d, (a, s) in enumerate(zip(actual, shape)))


def batch_axes(specs: list[Mapping[str, Any]]) -> dict[str, int] | None:
    """Where each input stacks examples into a batch: the dynamic dim that every input has and
    that is dim 0 of one of them (`batch` of features (B, ...) and of LSTM states (L, B, H));
    None when the inputs share no such dim (examples then go one at a time)."""
    dims = {spec["name"]: {str(n): int(d) for d, n in spec["dynamic"].items()} for spec in specs}
    shared = set.intersection(*(set(named) for named in dims.values())) if dims else set()
    leading = sorted(n for n in shared if any(named[n] == 0 for named in dims.values()))
    return {name: named[leading[0]] for name, named in dims.items()} if leading else None


def batches(examples: Mapping[str, np.ndarray], specs: list[Mapping[str, Any]],
            batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Examples joined `batch_size` at a time along each input's batch axis, else one at a time."""
    count = len(next(iter(examples.values())))
    axes = batch_axes(specs)
    step = batch_size if axes else 1
    for start in range(0, count, step):
        yield {name: np.concatenate(list(array[start:start + step]), axis=axes[name] if axes else 0)
               for name, array in examples.items()}


def batch_count(examples: Mapping[str, np.ndarray], specs: list[Mapping[str, Any]],
                batch_size: int) -> int:
    count = len(next(iter(examples.values())))
    step = batch_size if batch_axes(specs) else 1
    return -(-count // step)


def export_shapes(specs: list[Mapping[str, Any]]) -> list[tuple[int, ...]]:
    """Example shapes for torch.export: dynamic dims of size 1 become 2, so none specialises."""
    shapes = []
    for spec in specs:
        dynamic = {int(d) for d in spec["dynamic"]}
        shapes.append(tuple(max(2, s) if d in dynamic else s for d, s in enumerate(spec["shape"])))
    return shapes
