"""The model zoo through the pipeline: each checkpoint made by its own script when missing,
cleaned automatically, wrapped, exported and verified; the full matrices are marked slow."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.app import ensure_checkpoint
from tests.conftest import ROOT, compose_config, NATIVE_ONLY

# model -> (matrix overrides, the key-cleaning rule its checkpoint needs)
ZOO = {
    "kws_resnet": ((), None),
    "biosignal_cnn": ((), "strip leading 'model.' (Lightning)"),
    "conformer_rnnt": (("quantize.on_failure=fp32",), "strip '_orig_mod.' (torch.compile)"),
    "generator": ((), None),
}


def zoo_config(name: str, *overrides: str):
    """The model's config with its shipped checkpoint, made by its make_checkpoint if missing."""
    checkpoint = ROOT / compose_config(f"model={name}").model.checkpoint
    cfg = compose_config(f"model={name}", f"model.checkpoint={checkpoint}", *overrides)
    ensure_checkpoint({"checkpoint": str(checkpoint), "make_checkpoint": cfg.model.make_checkpoint}, [],
                      ROOT / "outputs" / "cache", logging.getLogger("test"))
    return cfg


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("zoo-cache")


@pytest.mark.parametrize("name", ZOO)
def test_each_zoo_model_exports_to_verified_fp32_onnx(name, cache, tmp_path):
    import stages  # noqa: F401  registers the stages
    from pipelines.runner import Runner

    cfg = zoo_config(name, f"cache.dir={cache}", "format=onnx", "precision=fp32")
    runs = Runner(cfg, tmp_path, logging.getLogger("test")).run()
    assert [run.part for run in runs] == [part.name for part in cfg.model.parts]
    for run in runs:
        assert run.status == "pass", run.error
        report = json.loads((tmp_path / "artifacts" / run.part / "key_report.json").read_text())
        rule = ZOO[name][1]
        assert [r["rule"] for r in report["applied"]] == ([rule] if rule else [])
        assert not report["missing"] and not report["unexpected"]
        accuracy = run.result("verify").get("accuracy")
        assert accuracy is None or accuracy["eager"] >= 0.95 and accuracy["top1_agreement"] == 1.0


def test_kws_is_built_by_its_factory_from_the_checkpoint_config():
    cfg = compose_config("model=kws_resnet")
    assert cfg.model.arch is None and cfg.model.factory == "models.kws.build"


def test_the_encoder_keeps_a_named_dynamic_time_axis_and_valid_lengths(cache, tmp_path):
    """feats (1, 80, T) with T dynamic and named in the ONNX graph; synthetic lengths <= T."""
    import onnx
    from omegaconf import OmegaConf

    import stages  # noqa: F401
    from pipelines.runner import Runner
    from stages.support.tensors import synthetic_examples

    cfg = zoo_config("conformer_rnnt", f"cache.dir={cache}", "format=onnx", "precision=fp32")
    specs = OmegaConf.to_container(cfg.model.parts[0].inputs, resolve=True, enum_to_str=True)
    lengths = synthetic_examples(specs, 256, 0)["lengths"]
    assert lengths.min() >= 16 and lengths.max() <= 64  # length_of: never longer than feats' T
    encoder = Runner(cfg, tmp_path, logging.getLogger("test")).run()[0]
    graph = onnx.load(str(tmp_path / "artifacts" / "encoder" / "model.onnx")).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*graph.input, *graph.output]}
    assert encoder.status == "pass" and dims["feats"] == [1, 80, "time"] and dims["lengths"] == [1]
    assert "time" in dims["encoded"][2]


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_each_zoo_model_matrix_verifies_all_six_cells(name, tmp_path):
    zoo_config(name)
    result = subprocess.run([sys.executable, "run.py", "-m", "recipe=matrix", f"model={name}", NATIVE_ONLY, *ZOO[name][0],
                             f"cache.dir={tmp_path}/cache", f"hydra.sweep.dir={tmp_path}/sweep"],
                            cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads((tmp_path / "sweep" / "matrix.json").read_text())
    parts = len(compose_config(f"model={name}").model.parts)
    assert len(rows) == 6 * parts
    for row in rows:
        fell_back = row["status"] == "fallback"
        assert row["status"] == "pass" or fell_back and "[size_audit]" in row["error"], row
        assert not fell_back or row["precision"] == "int8" and row["part"] == "decoder_step"
