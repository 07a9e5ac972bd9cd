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

import pytest

from tests.conftest import ROOT

CORPUS_CONF = ROOT / "corpus" / "conf"
INSTALL = [sys.executable, "-m", "pip", "install", "--quiet", "-r", "requirements-corpus.txt",
           "-c", "requirements.txt"]  # requirements.txt as constraints: torch stays as pinned
ACCEPTED = {"pass", "fallback", "mixed"}
# what a useful failure names: an ONNX/ATen operator, a module path or type, or a source line
NAMES_A_LAYER = re.compile(r"\baten[.:]\w+|\b[A-Z][a-z]+(?:[A-Z][a-z0-9]*)+\b|\b\w+(?:\.\w+)*\.\d+(?:\.\w+)+\b"
                           r"|\b(?:layer|module|node|op|operator)\b|\.py:\d+")


def ensure_corpus_deps() -> None:
    """Install the corpus's pinned test-only deps (transformers) into this interpreter if missing."""
    if importlib.util.find_spec("transformers") is None:
        subprocess.run(INSTALL, cwd=ROOT, check=True)


def corpus_models() -> list[str]:
    return sorted(path.stem for path in (CORPUS_CONF / "model").glob("*.yaml"))


def problems(row: dict) -> str | None:
    """Why a cell is not acceptable: a status outside pass/fallback/mixed without a named layer,
    a fallback or mixed cell without its reason."""
    status, error = row["status"], row.get("error") or ""
    if status in ACCEPTED:
        return None if status == "pass" or error else f"{status} without a reason"
    if status == "fail" and re.match(r"\[\w+\]", error) and NAMES_A_LAYER.search(error) \
            and "Traceback" not in error:
        return None
    return f"{status}: {error[:400]!r} names no stage and layer/operator"


@pytest.mark.slow
def test_the_corpus_sweep_passes_or_names_what_failed(tmp_path):
    ensure_corpus_deps()
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
