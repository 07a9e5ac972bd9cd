"""Sweeps past one process: Hydra's submitit launcher (as on a cluster, here its local executor)
and a local sweep started at the same moment on one cache: every shared stage is computed once,
both matrices are complete, and afterwards every entry still checks out byte for byte."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

from tests.conftest import ROOT, TEST_CONF, NATIVE_ONLY


def sweep(launcher: str, cache: Path, out: Path, checkpoint: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "run.py", "-m", f"hydra/launcher={launcher}", f"hydra.searchpath=[file://{TEST_CONF}]",
         "model=tiny", f"model.checkpoint={checkpoint}", NATIVE_ONLY, "format=onnx,pte", "precision=fp32,fp16",
         f"cache.dir={cache}", f"hydra.sweep.dir={out}", *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def manifests(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("*/manifest.json"))]


def stages(manifest: dict) -> list[dict]:
    return [s for part in manifest["parts"].values() for s in part["stages"]]


def test_a_submitit_sweep_and_a_joblib_sweep_at_once_compute_each_shared_stage_once(tmp_path, tiny_checkpoint):
    cache = tmp_path / "shared-cache"
    outs = {"submitit_local": tmp_path / "submitit", "local": tmp_path / "joblib"}
    jobs = {name: sweep(name, cache, out, tiny_checkpoint) for name, out in outs.items()}
    for name, job in jobs.items():
        output, _ = job.communicate(timeout=900)
        assert job.returncode == 0, f"{name}:\n{output[-3000:]}"

    for out in outs.values():  # each sweep has its four cells and its one report
        cells = json.loads((out / "matrix.json").read_text())
        assert sorted((c["precision"], c["format"], c["status"]) for c in cells) == [
            ("fp16", "onnx", "pass"), ("fp16", "pte", "pass"), ("fp32", "onnx", "pass"), ("fp32", "pte", "pass")]
    assert list((outs["submitit_local"] / ".submitit").iterdir()), "the jobs did not go through submitit"

    records = [s for out in outs.values() for m in manifests(out) for s in stages(m)]
    computed = Counter((s["stage"], s["key"]) for s in records if s["cache"] == "miss")
    assert computed and max(computed.values()) == 1, computed  # no key computed twice, by any job
    assert computed[next(k for k in computed if k[0] == "load_checkpoint")] == 1
    assert sum(1 for k in computed if k[0] == "load_checkpoint") == 1  # shared by all 8 cells

    again = sweep("local", cache, tmp_path / "verify", tiny_checkpoint, "cache.verify=full")
    output, _ = again.communicate(timeout=600)
    assert again.returncode == 0, output[-3000:]
    rerun = [s for m in manifests(tmp_path / "verify") for s in stages(m)]
    assert rerun and all(s["cache"] == "hit" for s in rerun), "an entry failed its full re-hash"
