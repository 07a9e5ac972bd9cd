"""Hydra's basic sweeper, validating a sweep with fewer compositions (Hydra finds plugins only
in the hydra_plugins namespace; conf/config.yaml selects this one: hydra/sweeper=covering)."""

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException
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
    checks the group options the other jobs bring against the config repository (a group option
    that does not exist, `precision=nope`, fails there): before anything runs, as before, at a
    fraction of the cost. A swept value of the wrong type for a key fails in its own job. Once
    the first batch composes, the sweep's start and number of cells go to its event stream
    (pipelines/events.py), for the progress its jobs show."""

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        jobs = covering_jobs(batch)
        super().validate_batch_is_legal(jobs[:1])
        first = set(jobs[0]) if jobs else set()
        _check_group_options(self.hydra_context.config_loader, self.config,
                             [o for overrides in jobs[1:] for o in overrides if o not in first])
        if self.batch_index == 1:  # the first batch composes: the sweep starts, with its size
            from pipelines.events import EVENTS, append

            append(Path(self.config.hydra.sweep.dir) / EVENTS, "sweep_start",
                   jobs=sum(len(batch) for batch in self.overrides))


def _check_group_options(loader, config, overrides: List[str]) -> None:
    """Each `group=option` among overrides names an option the group has, in the repository
    the sweep's config was composed from (its hydra.searchpath included): Hydra's own error,
    with the options there are, when not."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    if not parsed:
        return
    # Hydra 1.3.8's own step that makes the repository a composition reads (searchpath applied)
    _, repo = loader._parse_overrides_and_create_caching_repo(config.hydra.job.config_name, [])
    for override in parsed:
        group = override.key_or_group
        if override.is_delete() or override.is_hydra_override() or not repo.group_exists(group):
            continue
        option = override.get_value_element_as_str()
        if not repo.config_exists(f"{group}/{option}"):
            options = "\n".join(f"\t{name}" for name in repo.get_group_options(group))
            raise ConfigCompositionException(f"Could not find '{group}/{option}'\n\n"
                                             f"Available options in '{group}':\n{options}")


@dataclass
class CoveringSweeperConf:
    _target_: str = "hydra_plugins.covering_sweeper.CoveringSweeper"
    max_batch_size: Optional[int] = None
    params: Optional[Dict[str, str]] = None


ConfigStore.instance().store(group="hydra/sweeper", name="covering", node=CoveringSweeperConf,
                             provider="pipeline")
