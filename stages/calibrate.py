"""calibrate: representative inputs for quantization, one .npz shared by every format and precision."""
from __future__ import annotations

import numpy as np

from pipelines.errors import PipelineError, root_cause
from pipelines.registry import StageContext, stage

from .support.sample_files import examples_from_files, expand
from .support.tensors import as_examples, dataset_files, synthetic_examples


def _files(view) -> list[str]:
    """The outside files calibration reads (the runner hashes them into its key)."""
    calibration = view["calibration"]
    if calibration["source"] == "files":
        try:
            return [str(path) for path in expand(list(calibration["files"]))]
        except PipelineError:  # the stage itself says what is wrong with them
            return list(calibration["files"])
    return dataset_files(view["part"]["calibration_data"]) if calibration["source"] == "dataset" else []


@stage("calibrate", config=("calibration", "part.inputs", "part.calibration_data", "part.raw"),
       reads=_files)
def run(ctx: StageContext) -> dict:
    cfg = ctx.cfg.calibration
    specs = list(ctx.cfg.part.inputs)
    if cfg.source == "synthetic":
        examples = synthetic_examples(specs, cfg.samples, cfg.seed)
        origin = f"synthetic (seed {cfg.seed})"
    elif cfg.source == "files":
        examples, origin = examples_from_files(list(cfg.files), specs, ctx.cfg.part.raw, cfg.transform)
    else:
        examples, origin = _from_dataset(ctx.cfg.part.calibration_data, specs, cfg)
    count = len(next(iter(examples.values())))
    if count < cfg.samples:
        ctx.log.debug("calibration: %d examples available, %d asked", count, cfg.samples)
    examples = {name: array[:cfg.samples] for name, array in examples.items()}
    np.savez(ctx.workdir / "calibration.npz", **examples)
    used = len(next(iter(examples.values())))
    return {"source": cfg.source, "origin": origin, "samples": used,
            "summary": f"{used} examples from {origin}"}


def _from_dataset(dataset, specs, cfg) -> tuple[dict[str, np.ndarray], str]:
    if not dataset:
        raise PipelineError("calibration.source=dataset but this part names no calibration_data",
                            fix="use calibration=synthetic or calibration=files, or add "
                                "calibration_data: {_target_: ...} to the part")
    from hydra.utils import instantiate

    try:
        arrays = instantiate(dataset, samples=cfg.samples, seed=cfg.seed)
    except Exception as exc:
        raise PipelineError(f"calibration_data {dataset['_target_']} failed: {root_cause(exc)}",
                            fix=f"it is called as {dataset['_target_']}(samples={cfg.samples}, "
                                f"seed={cfg.seed}, <its other config keys>) and returns "
                                "{input name: array}; accept samples and seed (or **kwargs)") from exc
    return as_examples(arrays, specs, dataset["_target_"]), dataset["_target_"]
