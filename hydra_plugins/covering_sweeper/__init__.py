"""Hydra's basic sweeper, validating a sweep with fewer compositions (Hydra finds plugins only
in the hydra_plugins namespace; conf/config.yaml selects this one: hydra/sweeper=covering)."""

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.types import RunMode
from omegaconf import OmegaConf


def covering_jobs(batch: Sequence[Sequence[str]]) -> List[Sequence[str]]:
    """The jobs of batch, in order, that bring an override no earlier one had: together they
    use every value of every swept parameter (fp32, fp16, int8, onnx, pte: 4 of the 6 cells)."""
    seen = set()
    chosen = []
    for overrides in batch:
        if not set(overrides) <= seen:
            chosen.append(overrides)
            seen.update(overrides)
    return chosen


class CoveringSweeper(BasicSweeper):
    """BasicSweeper composes every job's config before launching any (to fail early), then the
    launcher composes each again: a warm sweep spends most of its time composing. This one
    composes the first job whole (a mistyped key or value given to every job fails there), and
    for the jobs that bring the other swept values only their defaults lists (a group option
    that does not exist, `precision=nope`, fails there): before anything runs, as before, at
    about half the cost. A swept value of the wrong type for a key fails in its own job. Once
    the first batch composes, the sweep's start and number of cells go to its event stream
    (pipelines/events.py), for the progress its jobs show."""

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        jobs = covering_jobs(batch)
        super().validate_batch_is_legal(jobs[:1])
        loader = self.hydra_context.config_loader
        common = list(OmegaConf.to_container(self.config.hydra.overrides.hydra))
        for overrides in jobs[1:]:
            loader.compute_defaults_list(self.config.hydra.job.config_name, common + list(overrides),
                                         RunMode.RUN)
        if self.batch_index == 1:  # the first batch composes: the sweep starts, with its size
            from pipelines.events import EVENTS, append

            append(Path(self.config.hydra.sweep.dir) / EVENTS, "sweep_start",
                   jobs=sum(len(batch) for batch in self.overrides))


@dataclass
class CoveringSweeperConf:
    _target_: str = "hydra_plugins.covering_sweeper.CoveringSweeper"
    max_batch_size: Optional[int] = None
    params: Optional[Dict[str, str]] = None


ConfigStore.instance().store(group="hydra/sweeper", name="covering", node=CoveringSweeperConf,
                             provider="pipeline")
