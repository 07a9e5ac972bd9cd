"""hydra/launcher=cluster through a real one-node Slurm (tests/slurm_cluster.py) on one cache
directory: a sweep, then the same sweep all hits; a job over its --mem and a job cancelled with
scancel mid-stage end as failed cells of a finished sweep (not a hung one), and leave nothing a
later job trusts."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import NATIVE_ONLY, ROOT, TEST_CONF
from tests.slurm_cluster import jobs, one_node_cluster

pytestmark = pytest.mark.slow  # 95 s on 2 cores: make test-all and make cluster-test run it


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with one_node_cluster(tmp_path_factory.mktemp("slurm")) as env:
        yield env  # a Slurm job's stages fork from a server of its own (SLURM_JOB_ID), in its process tree


def command(cache: Path, out: Path, checkpoint: Path, *extra: str, formats: str = "onnx,pte") -> list[str]:
    return [sys.executable, "run.py", "-m", "hydra/launcher=cluster", f"hydra.searchpath=[file://{TEST_CONF}]",
            "model=tiny", f"model.checkpoint={checkpoint}", NATIVE_ONLY, f"format={formats}", "precision=fp32",
            f"cache.dir={cache}", f"hydra.sweep.dir={out}", "hydra.launcher.partition=test",
            "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10", *extra]


def sweep(cluster, *args, formats: str = "onnx,pte") -> subprocess.CompletedProcess:
    return subprocess.run(command(*args, formats=formats), cwd=ROOT, env=cluster, capture_output=True, text=True,
                          timeout=600)


def cells(out: Path) -> list[tuple[str, str, str]]:
    return sorted((c["precision"], c["format"], c["status"]) for c in json.loads((out / "matrix.json").read_text()))


def records(out: Path) -> list[dict]:
    return [s for path in sorted(out.glob("*/manifest.json"))
            for part in json.loads(path.read_text())["parts"].values() for s in part["stages"]]


def test_a_sweep_runs_as_slurm_jobs_and_again_all_hits(cluster, tmp_path, tiny_checkpoint):
    cache = tmp_path / "shared-cache"
    first = sweep(cluster, cache, tmp_path / "first", tiny_checkpoint)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert cells(tmp_path / "first") == [("fp32", "onnx", "pass"), ("fp32", "pte", "pass")]
    array = {p.name for p in (tmp_path / "first" / ".submitit").iterdir() if p.is_dir()}  # submitit's job ids
    states = [state for job, state in jobs(cluster).items() if job.split("_")[0] in array]
    assert states == ["COMPLETED", "COMPLETED"]  # run by Slurm, one job a cell, to their end

    again = sweep(cluster, cache, tmp_path / "again", tiny_checkpoint)
    assert again.returncode == 0, again.stdout[-2000:]
    assert records(tmp_path / "again") and all(r["cache"] == "hit" for r in records(tmp_path / "again"))


def test_a_job_over_its_memory_is_a_failed_cell_and_leaves_nothing_trusted(cluster, tmp_path, tiny_checkpoint):
    cache = tmp_path / "shared-cache"
    killed = sweep(cluster, cache, tmp_path / "small", tiny_checkpoint, "hydra.launcher.mem_gb=null",
                   "+hydra.launcher.additional_parameters.mem=200M")  # a tenth of what a cell needs
    text = killed.stdout + killed.stderr
    assert killed.returncode == 1, text[-2000:]
    assert text.count("without a result (Exceeded job memory limit)") == 2, text[-2000:]  # Slurm's reason
    assert {c[2] for c in cells(tmp_path / "small")} == {"fail"}
    enough = sweep(cluster, cache, tmp_path / "enough", tiny_checkpoint)
    assert enough.returncode == 0, enough.stdout[-2000:]
    assert cells(tmp_path / "enough") == [("fp32", "onnx", "pass"), ("fp32", "pte", "pass")]


def test_a_job_cancelled_mid_stage_ends_the_sweep_with_its_cell_failed(cluster, tmp_path, tiny_checkpoint):
    out = tmp_path / "cancelled"
    running = subprocess.Popen(command(tmp_path / "cache", out, tiny_checkpoint, formats="pte"), cwd=ROOT,
                               env=cluster, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not list(out.glob("*/run.log")) and time.monotonic() < deadline:  # the job has begun
        time.sleep(0.2)
    time.sleep(2)  # and is in its stages
    ids = [p.name for p in (out / ".submitit").iterdir() if p.is_dir()]
    subprocess.run(["scancel", *ids], env=cluster, check=True)
    output, _ = running.communicate(timeout=180)  # not a hung sweep
    assert running.returncode == 1, output[-2000:]
    assert "ended CANCELLED" in output, output[-2000:]
    assert cells(out) == [("fp32", "pte", "fail")]
    again = sweep(cluster, tmp_path / "cache", tmp_path / "after", tiny_checkpoint, formats="pte")
    assert again.returncode == 0, again.stdout[-2000:]
    assert cells(tmp_path / "after") == [("fp32", "pte", "pass")]
