"""Shared fixtures: composing configs as run.py does, a tiny checkpoint, the demo checkpoint."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from pipelines.schema import register

ROOT = Path(__file__).resolve().parent.parent
TEST_CONF = Path(__file__).resolve().parent / "conf"
DEMO_CHECKPOINT = ROOT / "checkpoints" / "digits_cnn.pt"

register()


def compose_config(*overrides: str, isolated: bool = False) -> DictConfig:
    """The composed config of `python run.py <overrides>` (tests' own model dir on the path).
    Its stages run in the test's process unless `isolated` (quicker, and a test's monkeypatch
    reaches them); the runs through run.py, and tests asking for `isolated`, take the real path."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"hydra.searchpath=[file://{TEST_CONF}]",
                                            f"isolate_stages={str(isolated).lower()}", *overrides])


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    from tests.tiny import write_checkpoint

    return write_checkpoint(tmp_path / "tiny.pt")


@pytest.fixture
def isolated() -> bool:
    """run_tiny runs each stage in a process of its own, as a real run does."""
    return True


@pytest.fixture
def run_tiny(request, tmp_path: Path, tiny_checkpoint: Path):
    """Run the whole chain on the tiny model; returns the PartRun (stages in the test's process
    unless the test also asks for the `isolated` fixture)."""
    import stages  # noqa: F401  registers the stages
    from pipelines.runner import Runner

    isolated = "isolated" in request.fixturenames

    def run(*overrides: str, checkpoint: Path = tiny_checkpoint, cache: Path = tmp_path / "cache",
            model: str = "tiny"):
        cfg = compose_config(f"model={model}", f"model.checkpoint={checkpoint}", f"cache.dir={cache}",
                             *overrides, isolated=isolated)
        run_dir = tmp_path / "run"
        run_dir.mkdir(exist_ok=True)
        return Runner(cfg, run_dir, logging.getLogger("test")).run()[0]

    return run


@pytest.fixture(scope="session")
def demo_checkpoint() -> Path:
    """The shipped demo checkpoint, trained once if missing (as make demo does)."""
    if not DEMO_CHECKPOINT.exists():
        from models.digits import make_checkpoint

        make_checkpoint(DEMO_CHECKPOINT)
    return DEMO_CHECKPOINT
