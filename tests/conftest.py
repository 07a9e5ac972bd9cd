"""Shared fixtures: composing configs as run.py does, a tiny checkpoint, the demo checkpoint."""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from pipelines.memory import threads_per_job
from pipelines.schema import register

# each xdist worker computes on its share of the cores, as each job of a sweep does (set before
# torch or the suite's stage server loads; in the workers only, which would otherwise inherit the
# controller's): two workers of two threads on two cores spin-wait on each other's
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_job(int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

ROOT = Path(__file__).resolve().parent.parent
TEST_CONF = Path(__file__).resolve().parent / "conf"
DEMO_CHECKPOINT = ROOT / "checkpoints" / "digits_cnn.pt"

register()


def unavailable(reason: str) -> None:
    """A test dependency missing here (a device runtime, Chromium, transformers) fails the test
    under CI, where `make test` installs them all, so a broken install never hides as a skip;
    elsewhere the test skips with the reason."""
    (pytest.fail if os.environ.get("CI") == "true" else pytest.skip)(reason)


@pytest.fixture
def transformers_installed() -> None:
    """transformers and its tokenizers (requirements-corpus.txt), test-only dependencies."""
    try:
        found = importlib.util.find_spec("transformers") is not None
    except ValueError:  # in sys.modules as None: import blocked
        found = False
    if not found:
        unavailable("transformers is not installed (a test-only dependency: "
                    "pip install -r requirements-corpus.txt -c requirements.txt; make test does)")

@pytest.fixture(scope="session", autouse=True)
def one_stage_server() -> None:
    """Every test worker leases the host's stage server with both formats (and their prepared work)
    for the whole session (pipelines/stage_server.py), so it is started once: the workers and
    every `python run.py` a test starts fork their stages from it (each paid 2-7 s for a server
    of its own before). It waits for the server's imports and prepared work: every stage of the suite
    then forks hot, where a stage forked earlier would import what the server is importing."""
    import time

    from pipelines import isolation, stage_server

    isolation.start(["onnx", "pte"])
    deadline = time.monotonic() + 180
    while stage_server.status(isolation._lease.address)["pending"] and time.monotonic() < deadline:
        time.sleep(0.25)


# the tests of the pipeline run their target's devices natively only: emulated CPUs cost tens of
# seconds a cell. tests/test_devices.py runs them, and tests of kernel numbers name a device
# (tests/devices.py), so no verdict depends on the host's CPU either way.
NATIVE_ONLY = "verify.emulate=false"


def compose_config(*overrides: str) -> DictConfig:
    """The composed config of `python run.py <overrides>` (tests' own model dir on the path)."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        emulate = [] if any(o.startswith("verify.emulate=") for o in overrides) else [NATIVE_ONLY]
        return compose("config", overrides=[f"hydra.searchpath=[file://{TEST_CONF}]", *emulate, *overrides])


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    from tests.tiny import write_checkpoint

    return write_checkpoint(tmp_path / "tiny.pt")


@pytest.fixture
def in_process() -> list[str]:
    """Stages run in the test's process (isolate_stages=false): a test's monkeypatch reaches them."""
    return ["isolate_stages=false"]


@pytest.fixture
def run_tiny(request, tmp_path: Path, tiny_checkpoint: Path):
    """Run the whole chain on the tiny model; returns the PartRun. Its stages run in processes of
    their own (as in a real run) unless the test also asks for the in_process fixture."""
    import stages  # noqa: F401  registers the stages
    from pipelines.runner import Runner

    isolation = request.getfixturevalue("in_process") if "in_process" in request.fixturenames else []

    def run(*overrides: str, checkpoint: Path = tiny_checkpoint, cache: Path = tmp_path / "cache",
            model: str = "tiny"):
        cfg = compose_config(f"model={model}", f"model.checkpoint={checkpoint}", f"cache.dir={cache}",
                             *isolation, *overrides)
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
