"""The precision matrix: six verified cells and one report, upstream stages computed once,
quantization proven by the audit, and the INT8 fallback policy."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from stages.size_audit import check_precision
from tests.test_schemes import precision
from tests.conftest import NATIVE_ONLY, ROOT, TEST_CONF, unavailable
from tests.test_end_to_end import eager_logits, run_artifact

UPSTREAM = ("load_checkpoint", "clean_state_dict", "wrap", "calibrate")


def stage_misses(manifests: list[dict]) -> Counter:
    return Counter(s["stage"] for m in manifests for part in m["parts"].values()
                   for s in part["stages"] if s["cache"] == "miss")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, demo_checkpoint) -> Path:
    """`python run.py -m recipe=matrix` on the demo model, cold cache (the local launcher, 2 jobs at once)."""
    root = tmp_path_factory.mktemp("matrix")
    result = subprocess.run([sys.executable, "run.py", "-m", "recipe=matrix", NATIVE_ONLY, f"cache.dir={root}/cache",
                             f"hydra.sweep.dir={root}/sweep"], cwd=ROOT, capture_output=True, text=True,
                            timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stdout
    (root / "console.txt").write_text(result.stdout)
    return root / "sweep"


def test_the_sweep_streams_its_events_and_its_console_lines_say_how_far_it_is(sweep):
    """events.jsonl (pipelines/events.py) in the sweep and in each cell: the sweep's size, each
    job's start and end, every stage's start and end with hit, seconds and peak memory."""
    from pipelines.events import progress, read

    events = read(sweep / "events.jsonl")
    assert events[0]["event"] == "sweep_start" and events[0]["jobs"] == 6
    ends = {e["cell"]: e for e in events if e["event"] == "job_end"}
    assert sorted(ends) == sorted(p.name for p in sweep.glob("digits_cnn_*")) and len(ends) == 6
    assert all(e["status"] == "pass" for e in ends.values())
    stage_ends = [e for e in events if e["event"] == "stage_end"]
    assert {e["stage"] for e in stage_ends} >= {"load_checkpoint", "lower", "verify", "size_audit"}
    assert any(e["hit"] for e in stage_ends) and any(e["peak_mb"] for e in stage_ends if not e["hit"])
    assert len([e for e in events if e["event"] == "stage_start"]) == len(stage_ends)
    done = progress(events)
    assert (done["jobs"], done["done"], done["failed"], done["running"]) == (6, 6, 0, {})
    cell = read(sweep / "digits_cnn_int8_onnx" / "events.jsonl")  # a cell's own stream: only its events
    assert {e["cell"] for e in cell} == {"digits_cnn_int8_onnx"} and cell[-1]["event"] == "job_end"
    console = (sweep.parent / "console.txt").read_text()
    assert "[0/6 done" in console and "[5/6 done" in console  # each stage line: cells done of all, elapsed
    assert "digits_cnn_int8_pte  lower" in console  # and whose line it is


def test_the_sweep_builds_six_verified_cells_and_one_report(sweep):
    for name in ("matrix.html", "matrix.md", "matrix.csv", "matrix.json", "matrix_size.png",
                 "matrix_latency.png"):
        assert (sweep / name).stat().st_size > 0, name
    rows = json.loads((sweep / "matrix.json").read_text())
    assert {(r["precision"], r["format"]) for r in rows} == {
        (p, f) for p in ("fp32", "fp16", "int8") for f in ("onnx", "pte")}
    assert all(r["status"] == "pass" for r in rows), [(r["precision"], r["format"], r["error"]) for r in rows]
    by_cell = {(r["precision"], r["format"]): r for r in rows}
    for fmt in ("onnx", "pte"):
        assert by_cell["fp32", fmt]["max_abs"] <= 1e-4
        # 2e-2: a host with native fp16 arithmetic (avx512fp16, ARMv8.2) measures 0.0155 here
        assert by_cell["fp16", fmt]["max_abs"] <= 2e-2 and by_cell["fp16", fmt]["size_ratio_to_fp32"] <= 0.6
        int8 = by_cell["int8", fmt]
        assert int8["size_ratio_to_fp32"] <= 0.35
        assert int8["accuracy_eager"] - int8["accuracy"] <= 0.01 and int8["top1_agreement"] >= 0.98
    with open(sweep / "matrix.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 6
    table = (sweep / "matrix.md").read_text()
    assert table.count("| digits_cnn/classifier") == 6 and "vs fp32" in table


def test_every_cell_is_timed_and_every_onnx_cell_verified_in_the_browser(sweep):
    from stages.runtimes import browser

    rows = json.loads((sweep / "matrix.json").read_text())
    for row in rows:
        assert row["latency_p50_ms"] > 0 and row["eager_p50_ms"] > 0 and row["threads"] == 1
        assert row["speedup"] == pytest.approx(row["eager_p50_ms"] / row["latency_p50_ms"], rel=1e-2)
        devices = row["devices"]
        assert set(devices) == {"x86-64-vnni", "x86-64-avx2", "cortex-a76", "cortex-a53", "chromium-wasm"}
        assert row["target_status"] in ("pass", "partial"), row["target_reason"]  # emulated ones: NATIVE_ONLY
        for name, device in devices.items():
            if device["status"] == "skipped" and name != "chromium-wasm":
                assert "verify.emulate=false" in device["reason"] or "qemu-user cannot emulate" in device["reason"]
        web = devices["chromium-wasm"]
        if row["format"] == "pte":
            assert web["status"] == "n/a"
        elif browser.available() is None:  # Chromium and onnxruntime-web installed (make test does)
            assert web["status"] == "pass", web["reason"]
            assert "onnxruntime-web" in web["runtime"] and "wasm" in web["runtime"]
            assert web["p50_ms"] > 0 and web["cosine"] > 0.98
        else:
            assert web["status"] == "skipped" and web["reason"] == browser.available()


def test_matrix_html_opens_in_chromium_with_every_cell(sweep, tmp_path):
    from stages.runtimes import page

    if reason := page.available():
        unavailable(reason)
    shot = page.screenshot(sweep / "matrix.html")
    (tmp_path / "matrix.png").write_bytes(shot.png)
    assert len(shot.png) > 20_000
    for precision in ("fp32", "fp16", "int8"):
        for fmt in ("onnx", "pte"):
            assert f"{precision} {fmt}" in shot.text
    assert "PASS" in shot.text and "Plots" in shot.text
    assert (sweep / "matrix.html").read_text().count("data:image/png;base64,") == 2  # both plots inline


def test_every_cell_artifact_runs_in_its_runtime_and_agrees_with_eager(sweep, demo_checkpoint):
    images, expected, labels = eager_logits(demo_checkpoint)
    for row in json.loads((sweep / "matrix.json").read_text()):
        actual = run_artifact(Path(row["artifact"]), images)
        agreement = (actual.argmax(1) == expected.argmax(1)).mean()
        assert agreement >= 0.98, (row["precision"], row["format"], agreement)
        if row["precision"] != "int8":  # fp16 on a host with native fp16 (avx512fp16): 0.0155
            assert np.abs(actual - expected).max() <= 2e-2


def test_upstream_stages_run_once_per_sweep(sweep):
    manifests = [json.loads(p.read_text()) for p in sweep.glob("*/manifest.json")]
    assert len(manifests) == 6
    misses = stage_misses(manifests)
    assert all(misses[stage] == 1 for stage in UPSTREAM), misses
    assert misses["convert"] == 2  # once per format: every precision quantizes the same graph
    keys = {stage: {s["key"] for m in manifests for s in m["parts"]["classifier"]["stages"]
                    if s["stage"] == stage} for stage in UPSTREAM}
    assert all(len(k) == 1 for k in keys.values())


def test_two_concurrent_processes_share_upstream_entries(tmp_path, tiny_checkpoint):
    """Started together on an empty cache: one computes each shared stage, the other reuses it."""
    common = [f"hydra.searchpath=[file://{TEST_CONF}]", "model=tiny", f"model.checkpoint={tiny_checkpoint}",
              f"cache.dir={tmp_path}/cache"]
    jobs = [subprocess.Popen([sys.executable, "run.py", f"format={fmt}", NATIVE_ONLY, *common,
                              f"hydra.run.dir={tmp_path}/{fmt}"], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for fmt in ("onnx", "pte")]
    for job in jobs:
        output, _ = job.communicate(timeout=600)
        assert job.returncode == 0, output
    manifests = [json.loads((tmp_path / fmt / "manifest.json").read_text()) for fmt in ("onnx", "pte")]
    misses = stage_misses(manifests)
    assert all(misses[stage] == 1 for stage in UPSTREAM), misses
    assert misses["lower"] == 2


def test_an_int8_artifact_with_float_weights_fails_its_audit(run_tiny):
    from stages.formats import onnx as onnx_backend

    fp32 = run_tiny()
    inspection = onnx_backend.inspect(fp32.outputs["lower"].dir / "model.onnx")
    passed, reason = check_precision(precision("int8"), inspection)
    assert not passed and "int8 holds only 0%" in reason
    int8 = run_tiny("precision=int8")
    assert int8.status == "pass", int8.error
    audit = int8.result("size_audit")
    assert audit["passed"] and audit["weight_share_by_dtype"]["int8"] > 0.5 and audit["quantize_ops"] > 0


def test_pte_audit_counts_quantized_weights_and_ops(run_tiny):
    fp32, int8 = run_tiny("format=pte"), run_tiny("format=pte", "precision=int8")
    assert not check_precision(precision("int8"), fp32.result("size_audit"))[0]
    audit = int8.result("size_audit")
    assert audit["passed"] and audit["dequantize_ops"] > 0 and 0 < audit["delegated_share"] <= 1


def test_int8_that_misses_its_tolerance_falls_back_to_fp32_when_allowed(run_tiny):
    strict = ("precision=int8", "precision.tolerance.min_cosine=1.01")
    failed = run_tiny(*strict)
    assert failed.status == "fail" and "[verify]" in failed.error and "cosine" in failed.error
    fallback = run_tiny(*strict, "quantize.on_failure=fp32")
    assert fallback.status == "fallback" and "cosine" in fallback.fallback_reason
    assert fallback.result("quantize")["method"] == "none" and fallback.result("verify")["passed"]
    assert fallback.result("size_audit")["weight_share_by_dtype"].get("float32", 0) > 0.9


def test_dynamic_int8_for_both_formats(sweep, demo_checkpoint):
    """precision=int8_dynamic: int8 weights, activations quantized at run time, no calibration."""
    root = sweep.parent
    result = subprocess.run([sys.executable, "run.py", "-m", "precision=int8_dynamic", "format=onnx,pte", NATIVE_ONLY,
                             f"cache.dir={root}/cache", f"hydra.sweep.dir={root}/dynamic"], cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads((root / "dynamic" / "matrix.json").read_text())
    assert {(r["precision"], r["format"], r["status"]) for r in rows} == {
        ("int8_dynamic", "onnx", "pass"), ("int8_dynamic", "pte", "pass")}
    images, expected, _ = eager_logits(demo_checkpoint)
    for row in rows:
        audit = json.loads((Path(row["job_dir"]) / "report.json").read_text())["parts"][0]["size"]
        assert audit["weight_share_by_dtype"]["int8"] > 0.5
        assert audit["quantize_ops"] + audit["dequantize_ops"] > 0
        actual = run_artifact(Path(row["artifact"]), images)
        assert (actual.argmax(1) == expected.argmax(1)).mean() >= 0.98
