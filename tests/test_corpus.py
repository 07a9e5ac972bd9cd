"""The corpus (corpus/): real architectures the project did not write (transformers' BERT, Whisper,
ConvNeXt, ..., torch GRU/LSTM, a user LayerNorm MLP), seeded random weights, through the six cells
FP32/FP16/INT8 x ONNX/PTE in one sweep (recipe corpus). Slow: `make test-all`; installs
requirements-corpus.txt when transformers is missing, so the default tests never need it."""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

CORPUS_CONF = ROOT / "corpus" / "conf"
INSTALL = [sys.executable, "-m", "pip", "install", "--quiet", "-r", "requirements-corpus.txt",
           "-c", "requirements.txt"]  # requirements.txt as constraints: torch stays as pinned
ACCEPTED = {"pass", "fallback", "mixed"}
# what a useful failure names: an ATen or ONNX operator (aten.native_layer_norm, LayerNormalization),
# a module path or type (net.encoder.layer.0.attention, (Conv2d)), or a source line (modeling_x.py:150)
NAMES_A_LAYER = re.compile(r"aten[.:]\w+|\([A-Z]\w*\)|\b[a-z_]\w*(?:\.\w+){2,}|\b(?:[A-Z][a-z0-9]+){2,}\b|\.py:\d+")
EXCEPTION_NAME = re.compile(r"\b\w+(?:Error|Exception|Warning)\b")  # a bare exception names no layer


def ensure_corpus_deps() -> None:
    """Install the corpus's pinned test-only deps (transformers) into this interpreter if missing."""
    if importlib.util.find_spec("transformers") is None:
        subprocess.run(INSTALL, cwd=ROOT, check=True)


def corpus_models() -> list[str]:
    return sorted(path.stem for path in (CORPUS_CONF / "model").glob("*.yaml"))


def refresh_checkpoints(scratch: Path) -> None:
    """Rewrite checkpoints/corpus/<name>.pt where it no longer matches its entry (an edited arch):
    run.py makes a missing checkpoint but never replaces a stale one."""
    code = ("import sys, corpus.models as m\n"
            "for name in sys.argv[2:]: m.make_checkpoint(f'{sys.argv[1]}/{name}.pt')")
    subprocess.run([sys.executable, "-c", code, str(scratch), *corpus_models()], cwd=ROOT, check=True)
    for fresh in scratch.glob("*.pt"):
        shipped = ROOT / "checkpoints" / "corpus" / fresh.name
        if not shipped.exists() or shipped.read_bytes() != fresh.read_bytes():
            shipped.parent.mkdir(parents=True, exist_ok=True)
            fresh.replace(shipped)


def problems(row: dict) -> str | None:
    """Why a cell is not acceptable: a status outside pass/fallback/mixed without a named layer,
    a fallback or mixed cell without its reason."""
    status, error = row["status"], row.get("error") or ""
    if status in ACCEPTED:
        return None if status == "pass" or error else f"{status} without a reason"
    if status == "fail" and re.match(r"\[\w+\]", error) and "Traceback" not in error \
            and NAMES_A_LAYER.search(EXCEPTION_NAME.sub("", error)):
        return None
    return f"{status}: {error[:400]!r} names no stage and layer/operator"


@pytest.mark.slow
def test_the_corpus_sweep_passes_or_names_what_failed(tmp_path):
    ensure_corpus_deps()
    refresh_checkpoints(tmp_path / "checkpoints")
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, "run.py", "-m", "recipe=corpus", f"hydra.searchpath=[file://{CORPUS_CONF}]",
         f"cache.dir={tmp_path}/cache", f"hydra.sweep.dir={sweep}"],
        cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert (sweep / "matrix.json").exists(), result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads((sweep / "matrix.json").read_text())
    cells = {(r["model"], r["precision"], r["format"]) for r in rows}
    assert cells == {(m, p, f) for m in corpus_models() for p in ("fp32", "fp16", "int8")
                     for f in ("onnx", "pte")}
    bad = {f"{r['model']} {r['precision']} {r['format']}": why for r in rows if (why := problems(r))}
    assert not bad, "\n".join(f"{cell}: {why}" for cell, why in bad.items())
    assert all(r["status"] == "pass" for r in rows if r["precision"] == "fp32"), \
        [(r["model"], r["format"], r["error"]) for r in rows if r["precision"] == "fp32" and r["status"] != "pass"]
