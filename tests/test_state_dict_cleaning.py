"""Key mapping, comparison and error messages of stages.support.state_dict_cleaning."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from pipelines.errors import PipelineError
from stages.support.state_dict_cleaning import CleanOptions, clean_state_dict


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)
        self.norm = nn.BatchNorm1d(4)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = Block()
        self.head = nn.Linear(4, 2)


def expected_of(model: nn.Module) -> dict:
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


@pytest.fixture
def sd() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return dict(TinyNet().state_dict())


@pytest.fixture
def expected() -> dict:
    return expected_of(TinyNet())


def clean(weights, expected, ema=None, **options):
    return clean_state_dict(weights, expected, CleanOptions(**options), ema_state_dict=ema)


def error_of(weights, expected, ema=None, **options) -> PipelineError:
    with pytest.raises(PipelineError) as info:
        clean(weights, expected, ema, **options)
    return info.value


def prefixed(weights: dict, prefix: str) -> dict:
    return {f"{prefix}{k}": v for k, v in weights.items()}


def rules(report: dict) -> list[str]:
    return [entry["rule"] for entry in report["applied"]]


# ---------------------------------------------------------------- automatic wrapper stripping


def test_exact_match_applies_nothing(sd, expected):
    out, report = clean(sd, expected)
    assert report["applied"] == [] and report["matched"] == len(expected)
    assert report["missing"] == report["unexpected"] == report["shape_mismatch"] == report["dtype_cast"] == []
    assert all(torch.equal(out[k], v) for k, v in sd.items())
    json.dumps(report)


@pytest.mark.parametrize(
    ("prefix", "expected_rules"),
    [
        ("module.", ["strip leading 'module.' (DDP/DataParallel)"]),
        ("model.", ["strip leading 'model.' (Lightning)"]),
        ("_orig_mod.", ["strip '_orig_mod.' (torch.compile)"]),
        ("module._orig_mod.", ["strip '_orig_mod.' (torch.compile)", "strip leading 'module.' (DDP/DataParallel)"]),
        ("model.module.", ["strip leading 'model.' (Lightning)", "strip leading 'module.' (DDP/DataParallel)"]),
    ],
)
def test_wrapper_prefixes(sd, expected, prefix, expected_rules):
    out, report = clean(prefixed(sd, prefix), expected)
    assert set(out) == set(expected)
    assert rules(report) == expected_rules
    assert all(entry["count"] == len(sd) for entry in report["applied"])


def test_orig_mod_in_the_middle_of_keys(sd, expected):
    weights = {k.replace("encoder.", "encoder._orig_mod."): v for k, v in sd.items()}
    out, report = clean(weights, expected)
    assert set(out) == set(expected)
    assert report["applied"] == [{"rule": "strip '_orig_mod.' (torch.compile)", "count": 7}]


def test_prefix_kept_when_the_model_really_has_it(sd):
    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = TinyNet()

    weights = prefixed(sd, "model.")
    out, report = clean(weights, expected_of(Outer()))
    assert report["applied"] == [] and set(out) == set(weights)


def test_stripping_that_does_not_help_is_not_applied(sd, expected):
    weights = {**sd, "module.extra.weight": torch.ones(1)}
    _, report = clean(weights, expected)
    assert report["applied"] == [] and report["unexpected"] == ["module.extra.weight"]


def test_explicit_strip_prefixes(sd, expected):
    out, report = clean(prefixed(sd, "net."), expected, strip_prefixes=["net."])
    assert set(out) == set(expected)
    assert report["applied"] == [{"rule": "strip leading 'net.'", "count": len(sd)}]


# ---------------------------------------------------------------- select, rename, drop, EMA


def test_select(sd, expected):
    weights = {**prefixed(sd, "backbone."), "classifier.weight": torch.zeros(1)}
    out, report = clean(weights, expected, select="backbone")
    assert set(out) == set(expected)
    assert report["applied"][0] == {"rule": "select 'backbone.'", "count": len(sd)}
    assert report["unexpected"] == []


def test_select_without_matches_suggests_the_full_prefix(sd, expected):
    err = error_of(prefixed(sd, "model.backbone."), expected, select="backbone.")
    assert "model.clean.select=backbone." in err.message
    assert "model.clean.select=model.backbone." in err.fix


def test_rename_with_groups(sd, expected):
    weights = {k.replace("encoder.", "enc.blocks."): v for k, v in sd.items()}
    out, report = clean(weights, expected, rename={r"^enc\.blocks\.(\w+)": r"encoder.\1"})
    assert set(out) == set(expected)
    assert report["applied"][0]["count"] == 7


def test_rename_collision_and_bad_regex(sd, expected):
    err = error_of(sd, expected, rename={r"^encoder\.(layer|norm)": "encoder.x"})
    assert "model.clean.rename" in err.message and "same name" in err.message
    err = error_of(sd, expected, drop=["(unclosed"])
    assert "model.clean.drop: invalid regular expression" in err.message


def test_drop(sd, expected):
    weights = {**sd, "loss.pos_weight": torch.ones(2), "aux.head.weight": torch.ones(1)}
    out, report = clean(weights, expected, drop=[r"^loss\.", r"^aux\."])
    assert report["unexpected"] == [] and set(out) == set(expected)
    assert [entry["count"] for entry in report["applied"]] == [1, 1]


def test_prefer_ema(sd, expected):
    ema = {k: v + 1 for k, v in sd.items() if v.is_floating_point()} | {
        k: v for k, v in sd.items() if not v.is_floating_point()
    }
    out, report = clean(sd, expected, ema=ema, prefer_ema=True)
    assert torch.equal(out["head.weight"], sd["head.weight"] + 1)
    assert rules(report)[0] == "use EMA weights (prefer_ema)"
    out, _ = clean(sd, expected, ema=ema)
    assert torch.equal(out["head.weight"], sd["head.weight"])


def test_prefer_ema_without_ema_lists_what_exists(sd, expected):
    err = error_of(sd, expected, prefer_ema=True)
    assert "no EMA weights" in err.message and "encoder. (7 keys), head. (2 keys)" in err.message
    weights = {**sd, **prefixed(sd, "model_ema.")}
    assert "model.clean.select=model_ema." in error_of(weights, expected, prefer_ema=True).fix


# ---------------------------------------------------------------- comparison


def test_missing_keys_name_the_closest_key(sd, expected):
    weights = {k.replace("encoder.layer.", "encoder.layers.0."): v for k, v in sd.items()}
    err = error_of(weights, expected)
    assert "missing encoder.layer.weight (closest: encoder.layers.0.weight)" in err.message
    assert "model.clean.rename" in err.fix


def test_non_strict_returns_the_partial_dict(sd, expected):
    weights = {k: v for k, v in sd.items() if not k.startswith("head.")}
    with pytest.raises(PipelineError) as info:
        clean(weights, expected)
    assert "missing head.weight" in info.value.message and "model.clean.strict=false" in info.value.fix
    out, report = clean(weights, expected, strict=False)
    assert set(out) == set(weights)
    assert [m["key"] for m in report["missing"]] == ["head.weight", "head.bias"]
    assert report["strict"] is False


def test_missing_num_batches_tracked_is_reported_not_fatal(sd, expected):
    weights = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    out, report = clean(weights, expected)
    assert [m["key"] for m in report["missing"]] == ["encoder.norm.num_batches_tracked"]
    assert set(out) == set(weights)


def test_shape_mismatch_always_fails(sd, expected):
    weights = {**sd, "head.weight": torch.zeros(10, 4)}
    for strict in (True, False):
        err = error_of(weights, expected, strict=strict)
        assert "head.weight: checkpoint (10, 4) vs model (2, 4)" in err.message
        assert "model.clean.drop" in err.fix


def test_floating_dtype_is_cast_and_reported(sd, expected):
    weights = {k: v.half() if v.is_floating_point() else v.int() for k, v in sd.items()}
    out, report = clean(weights, expected)
    assert all(out[k].dtype == dtype for k, (_, dtype) in expected.items())
    cast = {entry["key"]: entry for entry in report["dtype_cast"]}
    assert cast["head.weight"] == {"key": "head.weight", "checkpoint": "torch.float16", "expected": "torch.float32"}
    assert cast["encoder.norm.num_batches_tracked"]["checkpoint"] == "torch.int32"
    json.dumps(report)


def test_float_into_integer_buffer_fails(sd, expected):
    weights = {**sd, "encoder.norm.num_batches_tracked": torch.tensor(3.5)}
    err = error_of(weights, expected)
    assert "encoder.norm.num_batches_tracked: checkpoint torch.float32 vs model torch.int64" in err.message


def test_foreign_checkpoint_and_capped_lists(expected):
    weights = {f"transformer.h.{i}.attn.weight": torch.zeros(1) for i in range(30)}
    big_expected = {**expected, **{f"blocks.{i}.proj.weight": ((1,), torch.float32) for i in range(20)}}
    err = error_of(weights, big_expected)
    assert "0/29 expected keys found, 29 missing, 30 unexpected" in err.message
    assert "... and 18 more (see key_report.json)" in err.message
    assert len(err.message.splitlines()) <= 13
    assert "belongs to another model" in err.fix and "model.checkpoint=" in err.fix


def test_missing_prefix_suggests_rename(sd, expected):
    weights = {k.removeprefix("encoder."): v for k, v in sd.items() if k.startswith("encoder.")}
    weights |= {k: v for k, v in sd.items() if k.startswith("head.")}
    err = error_of(weights, expected)
    assert "model.clean.rename={'^': 'encoder.'}" in err.fix
