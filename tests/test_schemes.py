"""Precisions as components: every precision a format builds is a registered scheme, and a
precision or option a format's scheme does not have is refused before any stage runs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipelines.errors import PipelineError
from pipelines.schema import PrecisionConfig
from stages.formats.schemes import FORMATS, check, chosen, options, schemes

CONF = Path(__file__).parents[1] / "conf" / "precision"


def precision(name: str, **options) -> dict:
    node = OmegaConf.merge(OmegaConf.structured(PrecisionConfig), OmegaConf.load(CONF / f"{name}.yaml"),
                           {"options": options})
    return OmegaConf.to_container(node)


def root(name: str, fmt: str, **options) -> dict:
    return {"precision": precision(name, **options), "format": {"name": fmt}}


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_shipped_precision_is_built_by_every_format(fmt):
    shipped = {path.stem for path in CONF.glob("*.yaml")}
    assert shipped <= set(schemes(fmt)), shipped - set(schemes(fmt))


def test_a_precision_a_format_lacks_is_refused_naming_what_it_builds():
    with pytest.raises(PipelineError) as raised:
        chosen("int3", "pte")
    error = raised.value
    assert error.stage == "config" and "precision=int3 has no scheme for format=pte" in error.message
    assert "fp32, fp16, int8" in error.message and "stages/formats/pte_precisions.py" in error.fix


def test_an_option_the_scheme_does_not_read_is_refused_naming_the_ones_it_does():
    with pytest.raises(PipelineError, match="takes no options, got group_size"):
        check(root("int8", "onnx", group_size=32))


def test_a_schemes_own_options_are_typed_and_checked(monkeypatch):
    from dataclasses import dataclass

    @dataclass
    class Grouped:
        group_size: int = 32

    built = chosen("int8", "onnx")
    monkeypatch.setitem(schemes("onnx"), "int8", type(built)(**{**built.__dict__, "options": Grouped}))
    assert options(precision("int8"), "onnx") == Grouped(32)
    assert options(precision("int8", group_size=64), "onnx") == Grouped(64)
    with pytest.raises(PipelineError, match="group_sise") as raised:
        options(precision("int8", group_sise=64), "onnx")
    assert "onnx_precisions.py" in raised.value.fix
    with pytest.raises(PipelineError, match="group_size"):
        options(precision("int8", group_size="many"), "onnx")


def test_calibration_is_read_only_by_the_schemes_that_declare_it():
    assert chosen("int8", "onnx").calibrated and chosen("int8", "pte").calibrated
    assert not chosen("int8_dynamic", "onnx").calibrated  # ORT computes activation ranges at run time
    assert not chosen("fp16", "pte").calibrated and options(precision("fp16"), "pte") is None


def test_the_check_imports_no_torch():
    """It runs in the main process, which stays light (stages run in their own processes)."""
    code = ("import sys; from stages.formats.schemes import FORMATS, schemes; "
            "[schemes(f) for f in FORMATS]; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1])
    assert out.stdout.strip() == "False"
