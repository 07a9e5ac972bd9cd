"""The pipeline's entry point: `python run.py recipe=android_dev`, `python run.py -m recipe=matrix`."""
from __future__ import annotations

import sys

from pipelines import isolation

# a single run's stage server starts first: torch imports while Hydra composes (a sweep's jobs
# start it at their first cache miss, so a warm sweep starts none)
if isolation.wanted_early(sys.argv[1:]):
    isolation.start()

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import stages  # noqa: E402, F401  (no torch: a sweep's jobs, forked from this process, inherit it)
from pipelines.app import run_job  # noqa: E402
from pipelines.code_graph import parse_packages  # noqa: E402
from pipelines.schema import register  # noqa: E402

register()
parse_packages(("pipelines", "stages", "models", "devices"))  # the stages' keys read it (jobs inherit it too)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    result = run_job(cfg)
    if HydraConfig.get().mode == RunMode.RUN and result["status"] == "fail":
        sys.exit(1)
    return result


if __name__ == "__main__":
    main()
