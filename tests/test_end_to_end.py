"""The user's commands, end to end on the demo model: artifacts run in their real runtimes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipelines.runner import CHAIN
from tests.conftest import ROOT, NATIVE_ONLY


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e-cache")


def run_cli(*args: str, cache: Path, run_dir: Path) -> subprocess.CompletedProcess:
    key = "hydra.sweep.dir" if "-m" in args else "hydra.run.dir"
    return subprocess.run([sys.executable, "run.py", NATIVE_ONLY, *args, f"cache.dir={cache}", f"{key}={run_dir}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)


def eager_logits(checkpoint: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import torch

    from models.digits import build, test_split

    payload = torch.load(checkpoint, weights_only=True)
    model = build(payload["config"]).eval()
    model.load_state_dict(payload["model_state_dict"])
    data = test_split()
    images = data["inputs"]["image"][:, 0]
    with torch.no_grad():
        return images, model(torch.from_numpy(images)).numpy(), data["labels"]


def run_artifact(path: Path, images: np.ndarray) -> np.ndarray:
    if path.suffix == ".onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {"image": images})[0]
    import torch
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(path).load_method("forward")
    bound = method.metadata.input_tensor_meta(0).sizes()[0]
    return np.concatenate([method.execute([torch.from_numpy(images[i:i + bound])])[0].numpy()
                           for i in range(0, len(images), bound)])


@pytest.mark.parametrize("recipe,suffix", [("web_dev", ".onnx"), ("android_dev", ".pte")])
def test_dev_recipes_give_verified_artifacts_and_a_warm_rerun_is_all_hits(
        recipe, suffix, cache, tmp_path, demo_checkpoint):
    first = run_cli(f"recipe={recipe}", cache=cache, run_dir=tmp_path / "first")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "PASS" in first.stdout and "Traceback" not in first.stdout + first.stderr
    report = json.loads((tmp_path / "first" / "report.json").read_text())
    assert report["status"] == "pass"
    artifact = Path(report["parts"][0]["artifact"])
    assert artifact.suffix == suffix

    images, expected, labels = eager_logits(demo_checkpoint)
    actual = run_artifact(artifact, images)
    assert np.abs(actual - expected).max() <= 1e-4
    assert (actual.argmax(1) == labels).mean() > 0.97
    verify = report["parts"][0]["verify"]
    assert verify["examples"] == len(labels) and verify["outputs"]["logits"]["max_abs"] <= 1e-4
    size = report["parts"][0]["size"]
    assert size["file_bytes"] == artifact.stat().st_size and 0 < size["compressed_bytes"] < size["file_bytes"]
    cases = artifact.parent / ("test_data_set_2" if suffix == ".onnx" else "model.bpte")
    assert cases.exists()  # the artifact carries its test cases, re-run by check-artifact:
    checked = subprocess.run([sys.executable, "-m", "pipelines.check_artifact", str(artifact.parent)],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert checked.returncode == 0 and checked.stdout.startswith("PASS") and "3 cases" in checked.stdout

    second = run_cli(f"recipe={recipe}", cache=cache, run_dir=tmp_path / "second")
    assert second.returncode == 0, second.stdout + second.stderr
    first_manifest = json.loads((tmp_path / "first" / "manifest.json").read_text())
    manifest = json.loads((tmp_path / "second" / "manifest.json").read_text())
    stages = manifest["parts"]["classifier"]["stages"]
    assert [s["stage"] for s in stages] == list(CHAIN) and all(s["cache"] == "hit" for s in stages)
    # each stage's own peak memory where it computed; a hit computes nothing and measures nothing
    cold = first_manifest["parts"]["classifier"]["stages"]
    assert all(s["peak_mb"] > 0 for s in cold if s["cache"] == "miss") and any(s["cache"] == "miss" for s in cold)
    assert all(s["peak_mb"] is None for s in stages)
    assert manifest["parts"]["classifier"]["artifacts"] == first_manifest["parts"]["classifier"]["artifacts"]
    assert manifest["checkpoint"]["sha256"] and manifest["packages"]["torch"].startswith("2.13.0")


def test_a_missed_tolerance_fails_the_run_without_a_traceback(cache, tmp_path, demo_checkpoint):
    result = run_cli("recipe=web_dev", "precision.tolerance.max_abs=1e-12", cache=cache, run_dir=tmp_path)
    assert result.returncode == 1
    assert "FAIL" in result.stdout and "max abs error" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert json.loads((tmp_path / "report.json").read_text())["status"] == "fail"


def test_an_unknown_precision_is_refused_at_compose_time(cache, tmp_path):
    result = run_cli("precision=int3", cache=cache, run_dir=tmp_path)
    assert result.returncode != 0
    text = result.stdout + result.stderr
    assert "precision/int3" in text and "fp32" in text and "Traceback" not in text
    assert not (tmp_path / "report.json").exists()
