"""Chains the registered stages for each part of a model, through the cache."""
from __future__ import annotations

import contextlib
import importlib
import logging
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from . import isolation, logs, memory
from .cache import Cache, compute_key
from .code_graph import code_version, module_file
from .digests import Digests, sha256
from .errors import PipelineError, root_cause
from .events import Events
from .registry import STAGES, Stage, StageContext, StageOutput
from .repair import repair
from .versions import library_versions, module_source_hash

CHAIN = ("load_checkpoint", "clean_state_dict", "wrap", "calibrate", "convert", "quantize",
         "preprocess", "lower", "verify", "verify_target", "baseline", "benchmark", "size_audit")


@dataclass
class StageRecord:
    stage: str
    key: str
    hit: bool
    seconds: float
    result: dict[str, Any]
    files: dict[str, str]  # sha256 of the outside files it read (the checkpoint)
    peak_mb: float | None = None  # the stage's own peak resident memory (pipelines/memory.py)


@dataclass
class PartRun:
    part: str
    status: str = "pass"  # pass | mixed (layers kept float) | fallback (fp32) | fail
    error: str | None = None
    fallback_reason: str | None = None
    float_layers: list[str] = field(default_factory=list)  # kept at fp32 by quantize.on_failure=mixed
    artifact_digests: dict[str, str] = field(default_factory=dict)  # artifacts/<part>/ file -> sha256
    attempts: list[dict[str, Any]] = field(default_factory=list)  # the builds that failed before
    records: list[StageRecord] = field(default_factory=list)
    outputs: dict[str, StageOutput] = field(default_factory=dict)

    def result(self, stage: str) -> dict[str, Any]:
        return self.outputs[stage].result if stage in self.outputs else {}


def config_view(root: dict[str, Any], paths: tuple[str, ...]) -> dict[str, Any]:
    """The nested sub-dict of root holding exactly the dotted paths a stage declared."""
    view: dict[str, Any] = {}
    for path in paths:
        *parents, leaf = path.split(".")
        source, target = root, view
        for name in parents:
            source = source[name]
            target = target.setdefault(name, {})
        target[leaf] = source.get(leaf) if isinstance(source, dict) else None
    return view


def referenced_modules(view: Any) -> list[str]:
    """The user modules a config names (`_target_`, `factory`), sorted."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for name, value in node.items():
                if name in ("_target_", "factory") and isinstance(value, str) and "." in value:
                    found.add(value.rsplit(".", 1)[0])
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(view)
    return sorted(found)


def referenced_code(view: Any) -> str:
    """Source versions of the user code a config names: editing a model's architecture (or a
    project module it imports) invalidates the stages that build it."""
    named = referenced_modules(view)
    inside = tuple(m for m in named if module_file(m))
    versions = [code_version(inside)[:16]] if inside else []
    for module in (m for m in named if m not in inside):
        try:
            versions.append(module_source_hash(module)[:16])
        except (ImportError, ValueError):  # unknown module: the stage that builds it says so
            versions.append(f"missing:{module}")
    return "".join(f"-{v}" for v in versions)


def run_stage(fn, ctx: StageContext, run_dir: Path, model_modules: list[str]) -> dict[str, Any]:
    """A stage's function with the libraries' output sent to the run's log; a library's
    exception becomes one line naming the stage (its full traceback goes to the log).
    The model's modules are imported first: a program that uses the custom operators they
    register (torch.library) can only be loaded where they are."""
    try:
        with logs.libraries_to_log():
            for module in model_modules:
                with contextlib.suppress(Exception):  # a broken one: the stage building it says so
                    importlib.import_module(module)
            return fn(ctx)
    except PipelineError:
        raise
    except Exception as exc:
        logging.getLogger(__name__).error("stage %s failed:\n%s", ctx.name, traceback.format_exc())
        raise PipelineError(root_cause(exc), stage=ctx.name, module=getattr(exc, "module", None),
                            fix=f"see {run_dir / 'run.log'} for the full traceback") from exc


def failure_record(exc: PipelineError, stage: str, run_dir: Path, seconds: float) -> dict[str, Any]:
    return {"stage": exc.stage or stage, "message": exc.message, "fix": exc.fix, "module": exc.module,
            "type": type(exc).__name__, "run_dir": str(run_dir), "seconds": round(seconds, 2),
            "when": time.strftime("%Y-%m-%d %H:%M:%S")}


def recorded_failure(record: dict[str, Any]) -> PipelineError:
    """The error a stage raised on this key before, raised again without running it."""
    seen = (f"recorded {record['when']} by the run in {record['run_dir']} ({record['seconds']:.1f}s), "
            f"not run again: cache.refresh=[{record['stage']}] retries it")
    return PipelineError(record["message"], stage=record["stage"], module=record["module"],
                         fix="; ".join(filter(None, [record["fix"], seen])))


class Runner:
    """Runs the chain for every part of the configured model and records what happened."""

    def __init__(self, cfg, run_dir: Path, log: logging.Logger, events: Events | None = None):
        self.root = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        self.run_dir = run_dir
        self.log = log
        self.events = events or Events(run_dir)
        cache_cfg = self.root["cache"]
        self.cache = Cache(Path(cache_cfg["dir"]), cache_cfg["verify"]) if cache_cfg["enabled"] else None
        self.digests = Digests(self.cache.root, cache_cfg["verify"] != "full") if self.cache else None
        self.refresh = set(cache_cfg["refresh"])
        self.isolate = self.root["isolate_stages"]
        self.model_modules = referenced_modules(self.root["model"])
        unknown = self.refresh - set(STAGES)
        if unknown:
            raise PipelineError(f"cache.refresh names unknown stages {sorted(unknown)}",
                                fix=f"use stage names from {list(CHAIN)}")

    def run(self) -> list[PartRun]:
        return [self.run_part(part) for part in self.root["model"]["parts"]]

    def run_part(self, part: dict[str, Any]) -> PartRun:
        run = PartRun(part["name"])
        root = {**self.root, "part": part}
        run.float_layers = list(root["quantize"]["keep_float"])
        self.log.info("%s:", " ".join(filter(None, [self.events.prefix(), part["name"]])))
        index = 0
        while index < len(CHAIN):
            name = CHAIN[index]
            try:
                self._run_stage(STAGES[name], root, run)
                verdict = run.result(name)
                if verdict.get("passed") is False:  # verify and size_audit judge the artifact
                    raise PipelineError(verdict["reason"], stage=name)
            except PipelineError as exc:
                exc.stage = exc.stage or name
                self.events.emit("stage_error", part=part["name"], stage=exc.stage, error=str(exc))
                if run.status != "fail" and repair(root, run, name, exc, self.log):
                    index = CHAIN.index("quantize")  # rebuild from quantize (pipelines/repair.py)
                    continue
                if run.status != "fail":
                    run.status, run.error = "fail", str(exc)
                if name not in run.outputs or name == CHAIN[-1]:
                    break  # nothing to go on with; a judged artifact still gets its audit
            index += 1
        self.events.emit("part_end", part=part["name"], status=run.status)
        return run

    def _run_stage(self, stage: Stage, root: dict[str, Any], run: PartRun) -> None:
        view = config_view(root, stage.config)
        needs = stage.needs_for(view)
        material = {
            "stage": stage.name,
            "code": stage.code_version(view)[:16] + referenced_code(view),
            "config": view,
            "inputs": {need: run.outputs[need].key for need in needs},
            "libraries": library_versions(),
            "files": {path: sha256(Path(path), self.digests) for path in
                      (stage.reads(view) if stage.reads else []) if Path(path).is_file()},
            **({"environment": stage.environment(view)} if stage.environment else {}),
        }
        key = compute_key(material)
        inputs = {need: run.outputs[need] for need in needs}
        self.events.emit("stage_start", part=run.part, stage=stage.name)
        started = time.monotonic()
        output, hit, peak = self._cached_call(stage, key, material, view, inputs, run.part)
        seconds = time.monotonic() - started
        run.outputs[stage.name] = output
        run.records.append(StageRecord(stage.name, key, hit, seconds, output.result,
                                       material["files"], peak))
        run.artifact_digests.update(self._copy_artifacts(stage, output.dir, run.part, output.digests))
        summary = output.result.get("summary", "")
        self.events.emit("stage_end", part=run.part, stage=stage.name, hit=hit, seconds=round(seconds, 3),
                         peak_mb=None if peak is None else round(peak, 1), summary=summary)
        prefix = self.events.prefix()  # a sweep's jobs interleave: each line says whose, and how far
        self.log.info("%s  %-17s %-4s %6.2fs  %s", prefix, stage.name, "hit" if hit else "run", seconds, summary)

    def _cached_call(self, stage, key, material, view, inputs, part) -> tuple[StageOutput, bool, float | None]:
        """The stage's output, whether it was a hit, and the peak memory (MiB) of computing it."""
        fresh = stage.name in self.refresh
        entry = None if fresh or self.cache is None else self.cache.lookup(key)  # no lock: an entry in place is whole
        if entry is not None:
            return StageOutput(key, entry.files, entry.result, entry.meta["files"]), True, None
        if self.isolate:  # a miss: a server with this cell's format (a run of hits starts none),
            isolation.start([self.root["format"]["name"]])  # importing while this job waits for the lock
        if self.cache is None:
            workdir = self.run_dir / "work" / part / stage.name
            shutil.rmtree(workdir, ignore_errors=True)
            workdir.mkdir(parents=True)
            result, peak = self._call(stage, view, inputs, workdir, part)
            return StageOutput(key, workdir, result), False, peak
        with self.cache.lock(key):  # a miss: compute once, whoever waited here then hits
            entry = None if fresh else self.cache.lookup(key)
            if entry is not None:
                return StageOutput(key, entry.files, entry.result, entry.meta["files"]), True, None
            failed = None if fresh else self.cache.failure(key)
            if failed is not None:
                raise recorded_failure(failed)
            started = time.monotonic()
            try:
                with self.cache.building(stage.name) as tmp:  # removed, and a full disk named, on failure
                    result, peak = self._call(stage, view, inputs, tmp / "files", part)
                    meta = {"stage": stage.name, "material": material, "result": result,
                            "seconds": time.monotonic() - started}
                    entry = self.cache.commit(key, tmp, meta)
            except PipelineError as exc:
                if not exc.transient:  # the same inputs fail the same way: say so at once next time
                    self.cache.record_failure(key, failure_record(exc, stage.name, self.run_dir,
                                                                  time.monotonic() - started))
                raise
            self.cache.forget_failure(key)
            return StageOutput(key, entry.files, result, entry.meta["files"]), False, peak

    def _call(self, stage: Stage, view, inputs, workdir: Path, part: str) -> tuple[dict[str, Any], float | None]:
        """Run the stage's function (in a process of its own unless isolate_stages=false):
        its result and its peak resident memory."""
        ctx = StageContext(stage.name, OmegaConf.create(view), inputs, workdir, self.log)
        try:
            if self.isolate:
                result, peak = isolation.call(stage.name, run_stage, stage.fn, ctx, self.run_dir,
                                              self.model_modules, after=stage.libraries_for(view))
            else:
                memory.new_peak()
                result, peak = run_stage(stage.fn, ctx, self.run_dir, self.model_modules), memory.peak_mb()
        except PipelineError:
            self._copy_artifacts(stage, workdir, part)  # what it wrote to explain the failure
            raise
        return result, peak

    def _copy_artifacts(self, stage: Stage, directory: Path, part: str,
                        digests: dict[str, str] | None = None) -> dict[str, str]:
        """Its artifacts into the run's artifacts/<part>/, hard-linked where the filesystem allows
        (a 4 GB model costs nothing to place); returns the digests its entry sealed for them."""
        from .digests import link_or_copy

        target, placed = self.run_dir / "artifacts" / part, {}
        for pattern in stage.artifacts:
            for path in directory.glob(pattern):
                for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
                    if not file.is_file():
                        continue
                    name = file.relative_to(directory).as_posix()
                    (target / name).parent.mkdir(parents=True, exist_ok=True)
                    (target / name).unlink(missing_ok=True)
                    link_or_copy(file, target / name)
                    if digests and name in digests:
                        placed[name] = digests[name]
        return placed
