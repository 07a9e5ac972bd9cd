"""pipelines/html_report.py: matrix.html is one self-contained page (no URL, plots inline) that
shows, in headless Chromium, every cell, its status, and why the others are not a plain pass."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipelines.html_report import plots, write_html
from pipelines.matrix import collect
from stages.runtimes.page import available, screenshot
from tests.conftest import unavailable

SUSPECT, KEPT_FLOAT, QUIET_LAYER = "blocks.2.conv", "head.fc", "blocks.0.act"
LAYERS = [("stem", "Conv2d", 0.002), (QUIET_LAYER, "ReLU", 0.003), ("blocks.1.conv", "Conv2d", 0.004),
          (SUSPECT, "Conv2d", 0.41), (KEPT_FLOAT, "Linear", 0.47)]
# in collect()'s order; precision, format, status, note, float layers, warnings, target (status, reason)
CELLS = [
    ("fp32", "onnx", "pass", None, [], [], ("pass", None)),
    ("fp16", "onnx", "pass", None, [], ["fp16 file is 0.52x fp32, expected <= 0.50x"],
     ("skipped", "no Chromium at /usr/bin/chromium (run web/install.sh)")),
    ("int8", "onnx", "mixed", f"kept float: {KEPT_FLOAT} (+1.2 KiB against the 6.4 KiB all-int8 build); "
     "first attempt failed: [verify] output 'logits' cosine 0.61 < 0.98", [KEPT_FLOAT], [], ("fail", "cosine 0.93 < 0.98")),
    ("fp32", "pte", "pass", None, [], [], None),
    ("fp16", "pte", "fallback", "fell back to fp32: [lower] fp16 LayerNorm unsupported", [], [], None),
    ("int8", "pte", "fail", f"[verify] output 'logits' cosine 0.638172 < 0.98; {SUSPECT} (Conv2d): precision lost "
     "here: relative error 0.40% before it, 41.00% after", [], [], None),
]
NAMES = [f"digits_cnn/classifier {p} {f}" for p, f, *_ in CELLS]


def _sweep(root: Path) -> Path:
    """Six job directories as a sweep leaves them: report.json, manifest.json, verify.json."""
    for index, (precision, fmt, status, note, floats, warnings, _) in enumerate(CELLS):
        job = root / str(index)
        (job / "artifacts" / "classifier").mkdir(parents=True)
        bad = status == "fail"
        verify = {"outputs": {"logits": {"max_abs": [2e-6, 4e-3, 0.05, 3e-6, 1e-6, 1.9][index],
                                         "cosine": 0.638172 if bad else 0.9995}},
                  "accuracy": {"eager": 0.9944, "artifact": 0.61 if bad else 0.99, "top1_agreement": 0.99}}
        if bad:
            verify["diagnosis"] = {
                "reference_error": 0.47, "runtime_error": 0.47,
                "layers": [{"module": m, "type": t, "error": e, "max_abs": e * 3, "cosine": 1 - e / 2}
                           for m, t, e in LAYERS],
                "suspects": [{"module": SUSPECT, "type": "Conv2d", "error": 0.41, "why":
                              "precision lost here: relative error 0.40% before it, 41.00% after"}]}
        (job / "artifacts" / "classifier" / "verify.json").write_text(json.dumps(verify))
        part = {"part": "classifier", "status": status, "error": note if bad else None,
                "repair": None if bad else note, "warnings": warnings, "float_layers": floats,
                "verify": verify, "size": {"file_bytes": [290_000, 146_000, 82_000, 293_000, 293_000, 76_000][index],
                                           "compressed_bytes": 70_000}, "seconds": 3.5,
                "artifact": str(job / "artifacts" / "classifier" / f"model.{fmt}")}
        report = {"model": "digits_cnn", "precision": precision, "format": fmt, "status": status, "parts": [part]}
        (job / "report.json").write_text(json.dumps(report))
        (job / "manifest.json").write_text(json.dumps({"host_cpu": {
            "machine": "x86_64", "model": "Test CPU 9000", "cores": 2, "avx2": True, "vnni": False}}))
    return root


def _rows(root: Path, new_keys: bool = True) -> list[dict]:
    """collect()'s rows, with the runtime keys it is growing filled in where it lacks them."""
    rows = collect(_sweep(root))
    assert [r["status"] for r in rows] == [c[2] for c in CELLS]
    for index, (row, cell) in enumerate(zip(rows, CELLS)):
        target = cell[6]
        extra = {"runtime": f"{'onnxruntime 1.31.1' if cell[1] == 'onnx' else 'executorch 1.5.1 XNNPACK'} CPU",
                 "threads": 1, "latency_p50_ms": [0.21, 0.2, 0.09, 0.18, 0.18, 0.4][index],
                 "latency_p90_ms": 0.5, "eager_p50_ms": 0.35,
                 "diagnosis": f"{SUSPECT} (Conv2d): precision lost here" if cell[2] == "fail" else None}
        extra["speedup"] = extra["eager_p50_ms"] / extra["latency_p50_ms"]
        if target:
            web = {"status": target[0], "reason": target[1], "mode": "browser",
                   "runtime": "onnxruntime-web 1.30.0 wasm, Chromium 156", "cpu_flags": []}
            if target[0] != "skipped":
                web.update(max_abs=3e-6, cosine=0.99999, top1_agreement=1.0, p50_ms=0.6)
            extra.update(target_status=target[0], target_reason=target[1], devices={"chromium-wasm": web})
        for key, value in extra.items():
            if new_keys and not row.get(key):
                row[key] = value
    return rows


def _self_contained(html: str) -> None:
    assert not re.search(r"https?://", html), re.search(r".{40}https?://.{40}", html)
    assert "<script" not in html and "<link" not in html and "url(" not in html
    sources = re.findall(r'src="([^"]*)"', html)
    assert sources and all(s.startswith("data:image/") for s in sources), [s[:40] for s in sources]


def test_matrix_html_is_self_contained_and_takes_rows_without_the_runtime_keys(tmp_path):
    rows = _rows(tmp_path, new_keys=False)  # today's collect(): no latency, runtime or target keys
    made = plots(rows, tmp_path)
    assert list(made) == ["size vs error"] and not (tmp_path / "matrix_latency.png").exists()
    html = write_html(rows, tmp_path, made).read_text()
    _self_contained(html)
    assert all(name in html for name in NAMES) and html.count('<section id="cell-') == 6
    assert "runtime not recorded" in html and "Test CPU 9000" in html


def test_matrix_html_in_chromium_shows_every_cell_and_why(tmp_path):
    if reason := available():
        unavailable(f"headless Chromium unavailable: {reason}")
    rows = _rows(tmp_path)
    made = plots(rows, tmp_path)
    assert {p.name for p in made.values()} == {"matrix_size.png", "matrix_latency.png"}
    page = write_html(rows, tmp_path, made)
    html = page.read_text()
    _self_contained(html)
    assert html.count('src="data:image/png;base64,') == 2

    shot = screenshot(page, width=1280)
    (tmp_path / "matrix_html.png").write_bytes(shot.png)  # to look at
    assert shot.png.startswith(b"\x89PNG") and len(shot.png) > 50_000 and shot.height > 1000
    text = shot.text
    for name in NAMES:
        assert text.count(name) >= 2, name  # in the table and in its details section
    for word in ("PASS", "MIXED", "FALLBACK", "FAIL", "SKIPPED"):
        assert word in text, word
    assert SUSPECT in text and "precision lost here" in text  # the diagnosis, visible
    assert f"kept float\t{KEPT_FLOAT}" in text or f"kept float: {KEPT_FLOAT}" in text
    assert "no Chromium at /usr/bin/chromium" in text  # the skipped browser check says why
    assert "onnxruntime 1.31.1 CPU" in text and "onnxruntime-web 1.30.0 wasm" in text
    assert "per-layer error vs eager (5 layers)" in text
    assert QUIET_LAYER in html and QUIET_LAYER not in text  # the per-layer table starts collapsed


def test_a_cell_whose_job_died_is_listed_not_dropped(tmp_path):
    """A native crash ends a joblib sweep: the matrix (python -m pipelines.matrix <dir>) still
    lists every cell the sweep asked for, those without a report as failed, with where to look;
    its .csv holds every row's columns though the first row (the dead cell) has fewer."""
    import csv

    import yaml

    from pipelines.matrix import collect, write

    (tmp_path / "multirun.yaml").write_text(yaml.safe_dump({
        "model": {"name": "digits_cnn"},
        "hydra": {"sweeper": {"params": {"precision": "fp32,int8", "format": "onnx"}},
                  "overrides": {"task": ["recipe=matrix"]}}}))
    job = tmp_path / "digits_cnn_int8_onnx"
    job.mkdir()
    (job / "report.json").write_text(json.dumps({"model": "digits_cnn", "precision": "int8", "format": "onnx",
                                                 "parts": [{"part": "classifier", "status": "pass"}]}))
    rows = {(r["precision"], r["format"]): r for r in collect(tmp_path)}
    assert set(rows) == {("fp32", "onnx"), ("int8", "onnx")}
    died = rows["fp32", "onnx"]
    assert died["status"] == "fail" and "no report: the job died or never ran" in died["error"]
    assert "digits_cnn_fp32_onnx/run.log" in died["error"]
    # the first cell of a sweep died (its model did not build): the csv still has every column
    (tmp_path / "multirun.yaml").write_text(yaml.safe_dump({
        "model": {"name": "digits_cnn"},
        "hydra": {"sweeper": {"params": {"model": "a_net,digits_cnn", "precision": "int8", "format": "onnx"}},
                  "overrides": {"task": ["recipe=matrix"]}}}))
    write(collect(tmp_path), tmp_path)
    with open(tmp_path / "matrix.csv", newline="") as handle:
        written = list(csv.DictReader(handle))
    assert [r["model"] for r in written] == ["a_net", "digits_cnn"] and "generation" in written[0]
