"""Bad input: a message naming the stage, the file or key and the fix; a non-zero exit; no Python
traceback; nothing in the cache for the stage that failed."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from tests.conftest import TEST_CONF, compose_config
from tests.test_end_to_end import run_cli
from tests.tiny import write_checkpoint


def cli(*args: str, tmp_path: Path):
    """`python run.py model=tiny ...` with the tests' config dir; returns (exit code, all text)."""
    result = run_cli(f"hydra.searchpath=[file://{TEST_CONF}]", *args, cache=tmp_path / "cache",
                     run_dir=tmp_path / "run")
    return result.returncode, result.stdout + result.stderr


def assert_nothing_cached_for(stage: str, cache: Path) -> None:
    stages = [json.loads(p.read_text())["stage"] for p in cache.glob("??/*/entry.json")]
    assert stage not in stages, stages
    assert not any((cache / "tmp").glob("*"))  # (none when the cache never built anything)


def assert_clean_failure(code: int, text: str, *fragments: str) -> None:
    assert code == 1, text
    assert "Traceback" not in text, text
    for fragment in fragments:
        assert fragment in text, (fragment, text)


# ---------------------------------------------------------------- the checkpoint file (CLI)


@pytest.mark.parametrize("content,expected", [
    (None, "does not exist"),
    (b"", "is empty (0 bytes)"),
    (bytes(range(256)) * 8, "is not in a known format"),
    ("truncated", "truncated or corrupt zip archive"),
])
def test_an_unreadable_checkpoint_is_named_with_its_fix(content, expected, tmp_path):
    path = tmp_path / "weights.pt"
    if content == "truncated":
        data = write_checkpoint(tmp_path / "whole.pt").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif content is not None:
        path.write_bytes(content)
    code, text = cli("model=tiny", f"model.checkpoint={path}", tmp_path=tmp_path)
    assert_clean_failure(code, text, "[load_checkpoint]", str(path), expected, "fix:")
    assert_nothing_cached_for("load_checkpoint", tmp_path / "cache")


def test_a_checkpoint_needing_pickle_is_refused_until_allowed(tmp_path, run_tiny):
    path = tmp_path / "pickled.pt"
    torch.save({"model_state_dict": torch.load(write_checkpoint(tmp_path / "t.pt"))["model_state_dict"],
                "config": Path("/data/run1")}, path)
    code, text = cli("model=tiny", f"model.checkpoint={path}", tmp_path=tmp_path)
    assert_clean_failure(code, text, "[load_checkpoint]", str(path), "pathlib.PosixPath",
                         "model.allow_pickle=true")
    assert_nothing_cached_for("load_checkpoint", tmp_path / "cache")
    assert run_tiny("model.allow_pickle=true", checkpoint=path).status == "pass"


def test_a_checkpoint_maker_that_fails_is_named_and_leaves_no_file(tmp_path):
    """A shipped entry's make_checkpoint that raises (an architecture that does not build) is the
    job's failure, named, written to its report: not a Hydra traceback that leaves no report."""
    from pipelines.app import ensure_checkpoint
    from pipelines.errors import PipelineError

    path = tmp_path / "made.pt"
    with pytest.raises(PipelineError, match=r"model.make_checkpoint: math.sqrt could not make \S*made.pt: "
                                            r"TypeError") as failure:
        ensure_checkpoint({"checkpoint": str(path), "make_checkpoint": "math.sqrt"}, [], tmp_path / "cache",
                          logging.getLogger("test"))
    assert failure.value.stage == "load_checkpoint" and not path.exists()


def test_an_unknown_model_names_the_options(tmp_path):
    code, text = cli("model=tiny_nett", tmp_path=tmp_path)
    assert code == 1 and "Traceback" not in text
    assert "model/tiny_nett" in text and "tiny" in text and "digits_cnn" in text and "kws_resnet" in text


def test_a_wrong_input_dtype_is_caught_before_export(tmp_path, tiny_checkpoint):
    code, text = cli("model=tiny", f"model.checkpoint={tiny_checkpoint}", "model.parts.0.inputs.0.dtype=int64",
                     tmp_path=tmp_path)
    assert_clean_failure(code, text, "[wrap] part 'net' does not accept inputs built from its input specs",
                         "x [1, 16] int64 (traced as [2, 16])", "fix:")
    assert_nothing_cached_for("wrap", tmp_path / "cache")


# ---------------------------------------------------------------- in-process: the stage and the cache


def test_another_models_checkpoint_names_the_missing_keys(run_tiny, tmp_path, demo_checkpoint):
    run = run_tiny(checkpoint=demo_checkpoint)
    assert run.status == "fail" and "[clean_state_dict]" in run.error
    assert "body.0.weight" in run.error and "fix:" in run.error
    assert_nothing_cached_for("clean_state_dict", tmp_path / "cache")
    report = json.loads((tmp_path / "run" / "artifacts" / "net" / "key_report.json").read_text())
    assert len(report["missing"]) == 4 and len(report["unexpected"]) == 8  # the run keeps the full list


def test_a_shape_mismatch_names_the_key_and_both_shapes(run_tiny, tmp_path):
    run = run_tiny("model.arch.hidden=64")
    assert run.status == "fail" and "[clean_state_dict]" in run.error
    assert "body.0.weight: checkpoint (32, 16) vs model (64, 16)" in run.error
    assert_nothing_cached_for("clean_state_dict", tmp_path / "cache")


def test_a_wrong_input_rank_is_caught_before_export(tmp_path, demo_checkpoint):
    import stages  # noqa: F401
    from pipelines.runner import Runner

    cfg = compose_config(f"model.checkpoint={demo_checkpoint}", f"cache.dir={tmp_path / 'cache'}",
                         "model.parts.0.inputs.0.shape=[1,8,8]")
    run = Runner(cfg, tmp_path, logging.getLogger("test")).run()[0]
    assert run.status == "fail" and "[wrap] part 'classifier' does not accept" in run.error
    assert "image [1, 8, 8] float32 (traced as [2, 8, 8])" in run.error and "channels" in run.error
    assert_nothing_cached_for("wrap", tmp_path / "cache")


def test_a_data_dependent_branch_is_located(run_tiny, tmp_path):
    run = run_tiny("model.arch._target_=tests.tiny.BranchingNet")
    assert run.status == "fail" and "[wrap]" in run.error and "data-dependent branch" in run.error
    assert "tests/tiny.py" in run.error and "BranchingNet" in run.error and "if y.sum() > 0" in run.error
    assert_nothing_cached_for("wrap", tmp_path / "cache")


@pytest.mark.parametrize("fmt,stage", [("onnx", "convert"), ("pte", "lower")])
def test_an_operator_the_format_lacks_is_named_with_its_module(fmt, stage, run_tiny, tmp_path):
    run = run_tiny("model.arch._target_=tests.tiny.CustomOpNet", f"format={fmt}")
    assert run.status == "fail" and f"[{stage}]" in run.error, run.error
    assert "tiny::wobble (from act (Wobble))" in run.error and "fix:" in run.error
    assert "maintainers is in the part's repro/act (act, 1 operators)" in run.error
    repro = tmp_path / "run" / "artifacts" / "net" / "repro" / "act"
    assert {"module.pt2", "inputs.pt", "repro.py", "README.md", "versions.json"} <= {p.name for p in repro.iterdir()}
    assert "model's own operators tiny.wobble.default" in (repro / "README.md").read_text()
    assert_nothing_cached_for(stage, tmp_path / "cache")


def test_torchscript_without_an_architecture_says_why_it_needs_one(run_tiny, tmp_path):
    from tests.tiny import TinyNet

    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(TinyNet()), path)
    run = run_tiny(checkpoint=path, model="tiny_program")
    assert run.status == "fail" and "[clean_state_dict]" in run.error and "TorchScript" in run.error
    assert "model.arch._target_" in run.error


# ---------------------------------------------------------------- what a newcomer meets


def test_token_ids_past_the_vocabulary_name_the_input_before_calibration(run_tiny, tmp_path):
    from tests.tiny import TokenNet

    path = tmp_path / "tokens.pt"
    torch.save(TokenNet().state_dict(), path)
    common = ("model.arch._target_=tests.tiny.TokenNet", "~model.arch.features", "~model.arch.hidden",
              "model.parts.0.inputs.0.name=ids", "model.parts.0.inputs.0.dtype=int64",
              "model.parts.0.inputs.0.shape=[1,5]", "model.parts.0.inputs.0.low=0", "calibration=synthetic")
    run = run_tiny(*common, "model.parts.0.inputs.0.high=11", checkpoint=path)
    assert run.status == "fail" and "[wrap]" in run.error
    assert "input 'ids' draws integers in [low, high) = [0, 11), and the model rejects 10" in run.error
    assert "IndexError" in run.error and "high = vocab_size" in run.error
    assert_nothing_cached_for("wrap", tmp_path / "cache")
    assert run_tiny(*common, "model.parts.0.inputs.0.high=10", checkpoint=path).status == "pass"


def test_a_calibration_callable_shows_its_own_error_and_how_it_is_called(run_tiny, tmp_path):
    run = run_tiny("precision=int8",
                   "model.parts.0.calibration_data._target_=tests.tiny.calibration_without_seed")
    assert run.status == "fail" and "[calibrate]" in run.error
    assert "TypeError: calibration_without_seed() got an unexpected keyword argument 'seed'" in run.error
    assert "(samples=128, seed=0" in run.error
    assert_nothing_cached_for("calibrate", tmp_path / "cache")


def test_a_wrapped_constructor_error_shows_the_root_cause(run_tiny):
    run = run_tiny("+model.arch.colour=red")
    assert run.status == "fail" and "[clean_state_dict]" in run.error
    assert "TypeError" in run.error and "colour" in run.error and "Error in call to target" not in run.error


def test_a_failing_executorch_call_names_its_error_operator_and_module_and_mixed_repairs_it(run_tiny):
    """A -1e9 mask constant has no fp16 value: ExecuTorch's scalar_tensor kernel refuses it at
    run time (0x12). The console says which error, operator and module; on_failure=mixed keeps
    that module in fp32 and the repaired program is verified before it is accepted."""
    repaired = run_tiny("format=pte", "precision=fp16", "model.arch._target_=tests.tiny.MaskedNet",
                        "quantize.on_failure=mixed")
    failed = repaired.attempts[0]
    assert failed["stage"] == "verify"
    assert "ExecuTorch error 0x12 (InvalidArgument) in operator aten::scalar_tensor.out" in failed["reason"]
    assert "from module floor" in failed["reason"]
    assert repaired.status == "mixed" and repaired.float_layers == ["floor"], repaired.error
    assert repaired.result("verify")["passed"]
