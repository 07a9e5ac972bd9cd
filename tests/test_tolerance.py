"""A part's own tolerance at a precision: the fields it sets win, the others keep the precision's."""
from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from stages.support.fidelity import part_tolerance
from tests.conftest import compose_config

OVERRIDE = "model.parts.0.tolerance={fp16: {max_abs: 0.05, min_cosine: null}}"


def as_stage_sees_it(*overrides: str):
    """precision and part as a stage's ctx.cfg holds them: a plain container, enums as strings."""
    root = OmegaConf.to_container(compose_config("model=tiny", *overrides), resolve=True, enum_to_str=True)
    return OmegaConf.create(root["precision"]), OmegaConf.create(root["model"]["parts"][0])


def test_set_fields_win_unset_fields_keep_the_precisions():
    tolerance = part_tolerance(*as_stage_sees_it("precision=fp16", OVERRIDE))
    assert tolerance.max_abs == 0.05 and tolerance.min_cosine is None
    assert tolerance.mean_abs is None and tolerance.max_accuracy_drop is None


def test_an_override_for_another_precision_changes_nothing():
    fp32, part = as_stage_sees_it("precision=fp32", OVERRIDE)
    assert part_tolerance(fp32, part) == fp32.tolerance


def test_an_unknown_precision_or_field_fails_at_compose_time():
    with pytest.raises(ConfigCompositionException):
        compose_config("model=tiny", "model.parts.0.tolerance={fp64: {max_abs: 1}}")
    with pytest.raises(ConfigCompositionException):
        compose_config("model=tiny", "model.parts.0.tolerance={fp16: {max_abs_: 1}}")


def test_verify_judges_with_the_parts_tolerance(run_tiny):
    """A bound no artifact meets on any CPU (fp32 ORT can equal eager bit for bit on one)."""
    run = run_tiny("model.parts.0.tolerance={fp32: {min_cosine: 1.5}}")
    assert run.status == "fail" and "[verify] output 'logits' cosine" in run.error
    assert "< 1.5" in run.error


def test_one_field_of_a_part_tolerance_is_set_from_the_command_line():
    from tests.conftest import compose_config

    cfg = compose_config("model.parts.0.tolerance.int4.min_top1_agreement=0.5")
    assert cfg.model.parts[0].tolerance.int4.min_top1_agreement == 0.5


def test_one_field_of_the_fallback_tolerance_is_set_from_the_command_line():
    cfg = compose_config("quantize.fallback_tolerance.max_rel=1e-3")
    assert cfg.quantize.fallback_tolerance.max_rel == 1e-3
