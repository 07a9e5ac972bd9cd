"""The pipeline's entry point: `python run.py recipe=android_dev`, `python run.py -m recipe=matrix`."""
from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from pipelines.schema import register

register()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    from pipelines.app import run_job

    result = run_job(cfg)
    if HydraConfig.get().mode == RunMode.RUN and result["status"] == "fail":
        sys.exit(1)
    return result


if __name__ == "__main__":
    main()
