"""Every YAML under conf/ composes; bad groups, values and keys fail at compose time, named."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from tests.conftest import ROOT, compose_config

CONF = ROOT / "conf"
ALL_YAML = sorted(p.relative_to(CONF) for p in CONF.rglob("*.yaml"))


def test_the_conf_tree_is_found():
    groups = {p.parts[0] for p in ALL_YAML if len(p.parts) > 1}
    assert {"model", "precision", "format", "calibration", "verify", "recipe"} <= groups


@pytest.mark.parametrize("path", ALL_YAML, ids=str)
def test_every_yaml_composes(path: Path):
    override = [] if len(path.parts) == 1 else ["/".join(path.parts[:-1]).replace("/", ".") + "=" + path.stem]
    cfg = compose_config(*override)
    assert cfg.precision.name and cfg.format.name
    # model=graph reads its one part from the checkpoint when it runs; every other model declares them
    assert bool(cfg.model.parts) == (cfg.model.name != "graph")


@pytest.mark.parametrize("recipe,fmt,precision", [
    ("android_dev", "pte", "fp32"), ("android_prod", "pte", "int8"), ("web_dev", "onnx", "fp32"),
    ("web_prod", "onnx", "int8"), ("server_fp16", "onnx", "fp16")])
def test_recipes_choose_format_and_precision(recipe, fmt, precision):
    cfg = compose_config(f"recipe={recipe}")
    assert (cfg.format.name.value, cfg.precision.name, cfg.recipe) == (fmt, precision, recipe)


def test_recipe_files_start_with_package_line_and_launch_command():
    for path in (CONF / "recipe").glob("*.yaml"):
        lines = path.read_text().splitlines()
        assert lines[0] == "# @package _global_", path
        assert lines[1].startswith("# python run.py") and f"recipe={path.stem}" in lines[1], path


def test_unknown_group_value_names_the_options():
    with pytest.raises(ConfigCompositionException) as err:
        compose_config("precision=int3")
    text = str(err.value)
    assert "precision/int3" in text and "fp32" in text and "int8" in text


def test_unknown_key_is_rejected_with_its_name():
    with pytest.raises(ConfigCompositionException) as err:
        compose_config("format.opsett=17")
    assert "Key 'opsett' not in 'OnnxFormat'" in str(err.value.__cause__)


@pytest.mark.parametrize("choice, key, schema", [("format=pte", "format.opset=11", "PteFormat"),
                                                 ("format=onnx", "format.xnnpack=false", "OnnxFormat"),
                                                 ("recipe=android_dev", "format.optimize=false", "PteFormat")])
def test_a_key_of_the_other_format_is_refused_at_compose_time(choice, key, schema):
    """One schema per format: an ONNX option on a .pte cell would change its key and do nothing."""
    with pytest.raises(ConfigCompositionException) as err:
        compose_config(choice, key)
    assert f"Key '{key.split('.')[1].split('=')[0]}' not in '{schema}'" in str(err.value.__cause__)


def test_each_format_has_only_its_own_keys():
    assert set(compose_config("format=pte").format) == {"name", "xnnpack"}
    assert set(compose_config("format=onnx", "format.opset=17").format) == {
        "name", "opset", "dynamic_dims", "optimize", "external_data_threshold_mb"}


def test_command_line_groups_win_over_the_recipe():
    cfg = compose_config("model.checkpoint=/tmp/x.pt", "precision=fp16", "format=pte", "recipe=web_dev")
    assert cfg.model.checkpoint == "/tmp/x.pt"
    assert (cfg.precision.name, cfg.format.name.value) == ("fp16", "pte")


def test_a_composed_config_pickles_as_a_sweep_job_returns_it():
    """The forked launcher sends each job's JobReturn (its config inside) back pickled: a type
    of the schema that cannot be found by name would fail every cell of every sweep."""
    import pickle

    cfg = compose_config("recipe=matrix")
    assert pickle.loads(pickle.dumps(cfg)) == cfg
