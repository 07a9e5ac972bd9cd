"""The stage registry: stages are named here, never by dotted path in YAML."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig

from .code_graph import ROOT, code_version


@dataclass(frozen=True)
class StageOutput:
    """What a finished stage hands to the stages after it."""

    key: str
    dir: Path  # the stage's files (a cache entry's, or the run's own when the cache is off)
    result: dict[str, Any]
    digests: dict[str, str] = field(default_factory=dict)  # sha256 of its files, as its entry sealed them


@dataclass
class StageContext:
    name: str
    cfg: DictConfig  # only the config paths the stage declared; exactly what its key hashes
    inputs: dict[str, StageOutput]  # the declared upstream stages, by name
    workdir: Path  # the only place the stage writes
    log: logging.Logger

    def input(self, stage: str) -> StageOutput:
        return self.inputs[stage]


def plain(node: Any) -> Any:
    """A config node (DictConfig, ListConfig) as plain dicts and lists, resolved."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True)


@dataclass(frozen=True)
class Stage:
    name: str
    fn: Callable[[StageContext], dict[str, Any]]
    # upstream stages whose outputs this one reads; a function of the stage's config view when
    # that depends on the config (quantize reads calibration only at int8)
    needs: tuple[str, ...] | Callable[[dict[str, Any]], tuple[str, ...]]
    config: tuple[str, ...]  # dotted config paths this stage reads (and is keyed on)
    # modules it imports by a computed name (importlib), which pipelines/code_graph.py cannot see
    # in its source; a function of the stage's config view when that depends on the config. Its
    # key hashes the source of these, its own module and all they import in the project.
    code: tuple[str, ...] | Callable[[dict[str, Any]], tuple[str, ...]]
    reads: Callable[[DictConfig], list[str]] | None = None  # outside files hashed into the key
    artifacts: tuple[str, ...] = field(default=())  # globs of its files copied into the run's artifacts/
    # facts about this host its result depends on (a latency: the CPU; a browser check: the
    # browser's version), hashed into the key so a shared cache never serves another host's
    environment: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    # slow libraries (and prepared work, `module:function`) its process needs first: the stage
    # server forks it once it has them, rather than the stage importing them again meanwhile;
    # a function of the stage's config view when that depends on the config (the format)
    libraries: tuple[str, ...] | Callable[[dict[str, Any]], tuple[str, ...]] = ()

    def needs_for(self, view: dict[str, Any]) -> tuple[str, ...]:
        return self.needs(view) if callable(self.needs) else self.needs

    def libraries_for(self, view: dict[str, Any]) -> tuple[str, ...]:
        return self.libraries(view) if callable(self.libraries) else self.libraries

    def code_version(self, view: dict[str, Any], root: Path = ROOT) -> str:
        named = self.code(view) if callable(self.code) else self.code
        return code_version((self.fn.__module__, *named), root)


STAGES: dict[str, Stage] = {}


def stage(name: str, *, needs: tuple[str, ...] | Callable[[dict[str, Any]], tuple[str, ...]] = (),
          config: tuple[str, ...] = (),
          code: tuple[str, ...] | Callable[[dict[str, Any]], tuple[str, ...]] = (), reads: Callable[[DictConfig], list[str]] | None = None,
          artifacts: tuple[str, ...] = (),
          environment: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
          libraries: tuple[str, ...] | Callable[[dict[str, Any]], tuple[str, ...]] = ()):
    """Register `fn(ctx) -> result dict` as a pipeline stage."""

    def register(fn: Callable[[StageContext], dict[str, Any]]):
        STAGES[name] = Stage(name, fn, needs, config, code, reads, artifacts, environment, libraries)
        return fn

    return register
