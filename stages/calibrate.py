"""calibrate: representative inputs for quantization, one .npz shared by every format and precision."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipelines.errors import PipelineError, root_cause
from pipelines.registry import StageContext, stage

from .support.tensors import as_examples, dataset_files, synthetic_examples


def _files(view) -> list[str]:
    """The outside files calibration reads (the runner hashes them into its key)."""
    calibration = view["calibration"]
    if calibration["source"] == "files":
        return list(calibration["files"])
    return dataset_files(view["part"]["calibration_data"]) if calibration["source"] == "dataset" else []


@stage("calibrate", config=("calibration", "part.inputs", "part.calibration_data"),
       code=("stages.support.tensors",), reads=_files)
def run(ctx: StageContext) -> dict:
    cfg = ctx.cfg.calibration
    specs = list(ctx.cfg.part.inputs)
    if cfg.source == "synthetic":
        examples = synthetic_examples(specs, cfg.samples, cfg.seed)
        origin = f"synthetic (seed {cfg.seed})"
    elif cfg.source == "files":
        examples = _from_files([Path(f) for f in cfg.files], specs)
        origin = ", ".join(Path(f).name for f in cfg.files)
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


def _from_files(paths: list[Path], specs) -> dict[str, np.ndarray]:
    if not paths:
        raise PipelineError("calibration.source=files but calibration.files is empty",
                            fix="list .npz/.npy files in calibration.files")
    parts: dict[str, list[np.ndarray]] = {}
    for path in paths:
        if not path.is_file():
            raise PipelineError(f"calibration file {path} does not exist",
                                fix="fix the path in calibration.files")
        try:
            loaded = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise PipelineError(f"calibration file {path} is not a readable .npz/.npy ({exc})",
                                fix="save it with numpy.savez / numpy.save") from exc
        arrays = dict(loaded) if path.suffix == ".npz" else {specs[0]["name"]: loaded}
        for name, array in as_examples(arrays, specs, str(path)).items():
            parts.setdefault(name, []).append(array)
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


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
