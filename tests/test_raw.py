"""preprocess=raw end to end on the demo: the artifact takes PNG bytes and gives named classes,
verified against "PIL decode, / 255, then eager PyTorch"; what a format or target cannot hold
stays in the app (app_steps.onnx) and io.json says so."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, compose_config


@pytest.fixture(scope="module")
def raw_run(tmp_path_factory, demo_checkpoint):
    import stages  # noqa: F401
    from pipelines.runner import Runner

    cache = tmp_path_factory.mktemp("raw-cache")

    def run(*overrides: str):
        run_dir = tmp_path_factory.mktemp("raw-run")
        cfg = compose_config(f"model.checkpoint={demo_checkpoint}", f"cache.dir={cache}", "preprocess=raw",
                             *overrides)
        return Runner(cfg, run_dir, logging.getLogger("test")).run()[0], run_dir / "artifacts" / "classifier"

    return run


def check_artifact(directory: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.check_artifact", str(directory)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_an_onnx_takes_png_bytes_with_decoding_inside(raw_run):
    run, artifacts = raw_run("format=onnx", "precision=fp32")
    assert run.status == "pass", run.error
    io = json.loads((artifacts / "io.json").read_text())
    assert [(s["name"], s["dtype"]) for s in io["inputs"]] == [("png", "uint8")]
    assert io["outputs"] == ["top_scores", "top_classes", "top_labels"]
    assert io["processing"]["custom_ops"] == "onnxruntime-extensions" and not io["processing"]["in_app"]
    verify = run.result("verify")
    assert verify["examples"] == 360 and "models.digits.preprocess_png" in verify["compared_with"]
    assert verify["accuracy"]["artifact"] == verify["accuracy"]["eager"] > 0.97
    assert verify["outputs"]["top_scores"]["max_abs"] < 1e-5 and verify["top1_agreement"]["top_labels"] == 1.0
    steps = {row["step"].split("(")[0]: row for row in run.result("benchmark")["steps"]}
    assert list(steps) == ["decode_image", "scale", "layout", "softmax", "topk"]
    assert all(row["bytes"] > 0 for row in steps.values())
    assert check_artifact(artifacts).returncode == 0


def test_a_pte_keeps_decoding_in_the_app_and_ships_it(raw_run):
    run, artifacts = raw_run("format=pte", "precision=fp32")
    assert run.status == "pass", run.error
    io = json.loads((artifacts / "io.json").read_text())
    assert [entry["step"] for entry in io["processing"]["in_app"]] == ["decode_image(colour=gray)"]
    assert io["processing"]["app_steps"] == "app_steps.onnx" and (artifacts / "app_steps.onnx").exists()
    assert json.loads((artifacts / "labels.json").read_text())[7] == "seven"
    assert io["outputs"] == ["top_scores", "top_classes"] and io["inputs"][0]["dtype"] == "uint8"
    assert run.result("verify")["top1_agreement"]["predicted class"] == 1.0
    assert check_artifact(artifacts).returncode == 0


def test_web_keeps_decoding_in_the_app_and_the_browser_agrees(raw_run):
    from stages.runtimes import browser

    run, artifacts = raw_run("recipe=web_prod")
    assert run.status == "pass", run.error
    io = json.loads((artifacts / "io.json").read_text())
    assert io["processing"]["app_steps_custom_ops"] == "onnxruntime-extensions"
    assert io["processing"]["custom_ops"] is None  # onnxruntime-web needs no extensions for it
    web = run.result("verify_target")["devices"]["chromium-wasm"]
    if browser.available() is not None:
        assert web["status"] == "skipped"
        return
    assert web["status"] == "pass" and web["top1_agreement"]["predicted class"] >= 0.98


def test_raw_without_a_raw_section_says_what_to_add(run_tiny):
    run = run_tiny("preprocess=raw")
    assert run.status == "fail" and "[preprocess] preprocess=raw but part 'net' declares no raw inputs" in run.error
