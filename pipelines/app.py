"""One job: compose -> run the chain for every part -> report.json, manifest.json, table."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from filelock import FileLock
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from . import isolation, logs, report
from .errors import PipelineError, root_cause
from .events import Events


def run_job(cfg: DictConfig) -> dict[str, Any]:
    """Run the configured pipeline; returns the run report (status pass, fail or fallback)."""
    started = time.monotonic()
    hydra = HydraConfig.get()
    run_dir = Path(hydra.runtime.output_dir)
    log = logs.setup(run_dir / "run.log")
    root = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    events = Events(run_dir, Path(hydra.sweep.dir) if hydra.mode == RunMode.MULTIRUN else None)
    events.emit("job_start", recipe=root["recipe"], model=root["model"]["name"],
                precision=root["precision"]["name"], format=root["format"]["name"], run_dir=str(run_dir))
    log.info("%s: %s %s -> %s  (%s)", root["recipe"], root["model"]["name"],
             root["precision"]["name"], root["format"]["name"], _relative(run_dir))
    try:
        if root["isolate_stages"]:  # a server started by run.py imports the format's libraries now
            isolation.preload([root["format"]["name"]])
        if not root["model"]["parts"] or root["model"].get("inputs") is not None:
            root = _graph_part(cfg, root)
        ensure_checkpoint(root["model"], list(hydra.overrides.task), Path(root["cache"]["dir"]), log)
        import stages  # noqa: F401  registers the stages; light, no torch
        from stages.formats.schemes import check

        from .runner import Runner

        check(root)

        runs = Runner(cfg, run_dir, log, events).run()
    except PipelineError as exc:
        log.error("error: %s", exc)
        result = {"recipe": root["recipe"], "model": root["model"]["name"],
                  "precision": root["precision"]["name"], "format": root["format"]["name"],
                  "status": "fail", "error": str(exc), "parts": [], "run_dir": str(run_dir)}
        _write(run_dir / "report.json", result)
        events.emit("job_end", status="fail", seconds=round(time.monotonic() - started, 3), error=str(exc))
        return result
    result = report.run_report(root, runs, run_dir, time.monotonic() - started)
    events.emit("job_end", status=result["status"], seconds=result["seconds"],
                error="; ".join(p["error"] for p in result["parts"] if p.get("error")) or None)
    _write(run_dir / "report.json", result)
    _write(run_dir / "manifest.json", report.manifest(root, runs, run_dir, list(hydra.overrides.task)))
    logs.console().write("\n" + report.summary_table(result) + "\n")
    log.info("report: %s", _relative(run_dir / "report.json"))
    return result


def _graph_part(cfg: DictConfig, root: dict[str, Any]) -> dict[str, Any]:
    """model=graph: the one part read from the checkpoint's own graph, set in `cfg`; the
    resolved root again."""
    if root["model"]["parts"]:
        raise PipelineError("model.inputs is set, but the model entry declares its parts: model.inputs is for "
                            "model=graph, whose part is read from the file", stage="load_checkpoint",
                            fix="declare the input shapes in the entry's parts, or use model=graph")
    from stages.support.graph_files import graph_part

    with logs.libraries_to_log():
        part = graph_part(root["model"])
    from .schema import PartConfig

    with open_dict(cfg):
        cfg.model.parts = [OmegaConf.merge(OmegaConf.structured(PartConfig), part)]
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def ensure_checkpoint(model: dict[str, Any], overrides: list[str], cache_dir: Path, log) -> None:
    """Make a shipped model's checkpoint when it is missing (once, even with parallel jobs), but
    never at a path given with model.checkpoint=: a missing file there is the user's to fix."""
    path = Path(model["checkpoint"])
    named = any(o.split("=", 1)[0].lstrip("+~") == "model.checkpoint" for o in overrides)
    if path.exists() or named or not model.get("make_checkpoint"):
        return
    from hydra.utils import get_method

    path.parent.mkdir(parents=True, exist_ok=True)
    locks = cache_dir / "locks"  # beside the cache's own locks, not among the user's checkpoints
    locks.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    with FileLock(str(locks / f"checkpoint-{digest}.lock")):
        if path.exists():
            return
        maker = model["make_checkpoint"]
        maker = maker if isinstance(maker, dict) else {"_target_": maker}
        log.info("making the checkpoint %s with %s", path, maker["_target_"])
        try:
            with logs.libraries_to_log():
                get_method(maker["_target_"])(path, **{k: v for k, v in maker.items() if k != "_target_"})
        except PipelineError:
            raise
        except Exception as exc:  # the maker's own error (an architecture that does not build)
            raise PipelineError(f"model.make_checkpoint: {maker['_target_']} could not make {path}: "
                                f"{root_cause(exc)}", stage="load_checkpoint",
                                fix="fix the model entry's arch (or give model.checkpoint= a file)") from exc


def _write(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=1, default=str))


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)
