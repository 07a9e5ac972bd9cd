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
    """`count` seeded examples per input: uniform in [low, high) (integers: inclusive)."""
    rng = np.random.default_rng(seed)
    stacks = {}
    for spec in specs:
        shape = (count, *spec["shape"])
        dtype = NUMPY_DTYPES[spec["dtype"]]
        if np.issubdtype(dtype, np.integer):
            values = rng.integers(int(spec["low"]), int(spec["high"]) + 1, size=shape)
        elif dtype == np.bool_:
            values = rng.random(shape) < 0.5
        else:
            values = rng.uniform(spec["low"], spec["high"], size=shape)
        stacks[spec["name"]] = values.astype(dtype)
    return stacks


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


def batch_dim_dynamic(specs: list[Mapping[str, Any]]) -> bool:
    return all(0 in {int(d) for d in spec["dynamic"]} for spec in specs)


def batches(examples: Mapping[str, np.ndarray], specs: list[Mapping[str, Any]],
            batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Examples grouped along dim 0 when every input's dim 0 is dynamic, else one at a time."""
    count = len(next(iter(examples.values())))
    step = batch_size if batch_dim_dynamic(specs) else 1
    for start in range(0, count, step):
        yield {name: np.concatenate(list(array[start:start + step]), axis=0)
               for name, array in examples.items()}


def batch_count(examples: Mapping[str, np.ndarray], specs: list[Mapping[str, Any]],
                batch_size: int) -> int:
    count = len(next(iter(examples.values())))
    step = batch_size if batch_dim_dynamic(specs) else 1
    return -(-count // step)


def export_shapes(specs: list[Mapping[str, Any]]) -> list[tuple[int, ...]]:
    """Example shapes for torch.export: dynamic dims of size 1 become 2, so none specialises."""
    shapes = []
    for spec in specs:
        dynamic = {int(d) for d in spec["dynamic"]}
        shapes.append(tuple(max(2, s) if d in dynamic else s for d, s in enumerate(spec["shape"])))
    return shapes
