"""The sweep's up-front check (hydra_plugins/covering_sweeper): cheaper, still before any job."""
from __future__ import annotations

import subprocess
import sys

import pytest

from hydra_plugins.covering_sweeper import covering_jobs
from tests.conftest import ROOT, NATIVE_ONLY


def test_the_covering_jobs_use_every_swept_value():
    matrix = [[f"precision={p}", f"format={f}"] for p in ("fp32", "fp16", "int8") for f in ("onnx", "pte")]
    chosen = covering_jobs(matrix)
    assert chosen == [matrix[0], matrix[1], matrix[2], matrix[4]]
    assert {o for job in chosen for o in job} == {o for job in matrix for o in job}
    assert covering_jobs([]) == []


@pytest.mark.parametrize("bad, says", [
    ("precision=fp32,nope", "Could not find 'precision/nope'"),  # a swept value: a later job's
    ("verify.nokey=3", "Could not override 'verify.nokey'"),  # given to every job
], ids=["swept-group-option", "common-key"])
def test_a_bad_override_fails_the_sweep_before_any_job_runs(tmp_path, bad, says):
    done = subprocess.run([sys.executable, "run.py", "-m", "recipe=matrix", NATIVE_ONLY, *bad.split(),
                           f"cache.dir={tmp_path / 'cache'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and says in done.stderr + done.stdout
    sweep = tmp_path / "sweep"  # a common key fails composing the sweep's own config, earlier still
    assert not sweep.exists() or [p.name for p in sweep.iterdir()] == ["multirun.yaml"]  # no job ran
    assert not (tmp_path / "cache").exists()
