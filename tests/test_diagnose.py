"""When a cell breaches its tolerance it names the layer (by module path), and
quantize.on_failure=mixed keeps that layer float until the tolerance holds."""
from __future__ import annotations

import json

import numpy as np
import torch
import pytest

from pipelines.report import part_report
from tests.tiny import write_norm_checkpoint, write_outlier_checkpoint

SYNTHETIC = "calibration=synthetic"


@pytest.fixture
def outlier(tmp_path):
    return write_outlier_checkpoint(tmp_path / "outlier.pt")


@pytest.mark.parametrize("fmt", ["onnx", "pte"])
def test_a_breached_tolerance_names_the_layer_that_lost_precision(run_tiny, outlier, fmt):
    run = run_tiny(f"format={fmt}", "precision=int8", SYNTHETIC, model="tiny_outlier", checkpoint=outlier)
    assert run.status == "fail" and "[verify]" in run.error
    assert "head (Linear): precision lost here" in run.error
    diagnosis = run.result("verify")["diagnosis"]
    assert diagnosis["suspects"][0]["module"] == "head"
    layers = {layer["module"]: layer for layer in diagnosis["layers"]}
    assert set(layers) == {"fc", "head"} and layers["head"]["error"] > 0.5 > layers["fc"]["error"]


@pytest.mark.parametrize("fmt", ["onnx", "pte"])
def test_mixed_keeps_the_named_layer_float_and_reports_what_it_cost(run_tiny, outlier, tmp_path, fmt):
    run = run_tiny(f"format={fmt}", "precision=int8", SYNTHETIC, "quantize.on_failure=mixed",
                   model="tiny_outlier", checkpoint=outlier)
    assert run.status == "mixed" and run.float_layers == ["head"], run.error
    assert run.result("verify")["passed"] and run.result("size_audit")["passed"]
    assert run.result("size_audit")["kept_float_parameters"] == 64 * 4 + 4
    report = part_report(run, tmp_path / "run")
    assert report["repair"].startswith("kept float: head (") and "all-int8 build" in report["repair"]
    assert report["attempts"][0]["keep_float"] == [] and report["attempts"][0]["bytes"] > 0
    assert "kept float: head" in run.result("quantize")["method"]


def test_mixed_gives_up_after_max_float_layers_and_falls_back_to_fp32(run_tiny, outlier):
    run = run_tiny("precision=int8", SYNTHETIC, "quantize.on_failure=mixed", "quantize.max_float_layers=0",
                   model="tiny_outlier", checkpoint=outlier)
    assert run.status == "fallback" and run.float_layers == []
    assert run.result("quantize")["method"] == "none" and run.result("verify")["passed"]


def test_keep_float_can_be_set_by_hand(run_tiny, outlier):
    run = run_tiny("precision=int8", SYNTHETIC, "quantize.keep_float=[head]", model="tiny_outlier",
                   checkpoint=outlier)
    assert run.status == "pass" and run.float_layers == ["head"]


def test_the_diagnosis_finds_where_a_runtime_kernel_leaves_the_program(run_tiny, tmp_path, monkeypatch,
                                                                         in_process):
    """With the fp16 LayerNorm workaround off, ExecuTorch's kernel breaks the .pte (the program
    itself is right): bisecting prefixes of the program names the LayerNorm."""
    import stages.upstream.executorch as workarounds

    monkeypatch.setattr(workarounds, "FP16_UNSAFE_OPS", ())  # read by the pte fp16 scheme when it runs
    checkpoint = write_norm_checkpoint(tmp_path / "norm.pt")
    run = run_tiny("format=pte", "precision=fp16", SYNTHETIC, model="tiny_norm", checkpoint=checkpoint)
    assert run.status == "fail"
    diagnosis = run.result("verify")["diagnosis"]
    at = diagnosis["runtime_diverges_at"]
    assert (at["module"], at["type"]) == ("blocks.0.1", "LayerNorm") and at["probes"] <= 6
    assert diagnosis["reference_error"] < 1e-2 < diagnosis["runtime_error"]
    assert "blocks.0.1 (LayerNorm): the runtime's kernels leave the program's arithmetic" in run.error


def test_diagnosis_always_gives_every_layer_even_when_passing(run_tiny):
    run = run_tiny("precision=int8", "verify.diagnose=always")
    assert run.status == "pass"
    diagnosis = run.result("verify")["diagnosis"]
    # body.1 (ReLU) is folded into the quantizer's QuantizeLinear: it has no output of its own
    assert [layer["module"] for layer in diagnosis["layers"]] == ["body.0", "body.2", "body"]
    assert all(np.isfinite(layer["error"]) for layer in diagnosis["layers"])
    assert json.loads(json.dumps(diagnosis)) == diagnosis


def test_an_activation_the_quantizer_folds_is_not_taken_for_lost_precision(run_tiny, tmp_path):
    """onnxruntime folds stem's ReLU6 into the QuantizeLinear after its conv: the graph's value
    there is pre-activation, and stem's output is that value clipped to [0, 6]."""
    from tests.tiny import BlockNet

    torch.manual_seed(0)
    path = tmp_path / "block.pt"
    torch.save(BlockNet().state_dict(), path)
    run = run_tiny("precision=int8", SYNTHETIC, "verify.diagnose=always", model="tiny_block", checkpoint=path)
    layers = {layer["module"]: layer for layer in run.result("verify")["diagnosis"]["layers"]}
    assert layers["stem"]["error"] < 0.05 and layers["stem.conv"]["error"] < 0.05


@pytest.mark.parametrize("fmt", ["onnx", "pte"])
def test_a_conv_kept_float_leaves_the_activation_that_shared_its_scale_quantized(run_tiny, tmp_path, fmt):
    """XNNPACKQuantizer's ReLU6 shares its conv's output observer: keeping the conv float must
    give the ReLU6 one of its own, not a reference to nothing (torchao's KeyError: conv2d)."""
    from tests.tiny import BlockNet

    torch.manual_seed(0)
    path = tmp_path / "block.pt"
    torch.save(BlockNet().state_dict(), path)
    run = run_tiny(f"format={fmt}", "precision=int8", SYNTHETIC, "quantize.keep_float=[stem.conv]",
                   model="tiny_block", checkpoint=path)
    assert run.status == "pass" and run.float_layers == ["stem.conv"], run.error
    assert "kept float: stem.conv" in run.result("quantize")["method"]


def test_mixed_stops_when_the_layers_kept_float_do_not_cut_the_error():
    """Each attempt costs a rebuild and a verification: two layers kept float in a row that
    leave the error where it was end the mixing (then fp32), naming what they left."""
    from pipelines.repair import _stalled

    def attempt(kept, max_rel):
        return {"precision": "fp16", "keep_float": kept, "max_rel": max_rel}

    helping = [attempt([], 9e-3), attempt(["a"], 4e-3), attempt(["a", "b"], 3.9e-3)]
    assert _stalled(helping) == ""
    stuck = [attempt([], 9e-3), attempt(["a"], 8.5e-3), attempt(["a", "b"], 8.4e-3)]
    assert _stalled(stuck) == ("keeping a, b float left the error at 8.40e-03 of the largest value "
                               "(was 9.00e-03): it builds up across the model")
    assert _stalled(stuck[1:]) == ""  # one layer that did not help is not yet a pattern


def test_a_cell_that_falls_back_is_judged_as_a_precision_fp32_cell():
    """One fp32 tolerance: conf/precision/fp32.yaml's, with the fields quantize.fallback_tolerance sets."""
    import logging
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from pipelines.errors import PipelineError
    from pipelines.repair import repair

    fp32 = OmegaConf.to_container(OmegaConf.load("conf/precision/fp32.yaml").tolerance)
    fp32 = {**{key: None for key in ("mean_abs", "max_accuracy_drop", "min_top1_agreement", "min_map_iou",
                                    "min_box_iou")}, **fp32}
    unset = {key: "???" for key in fp32}  # OmegaConf.to_container's MISSING
    for fallback, expected in ((unset, fp32), ({**unset, "max_abs": 0.5}, {**fp32, "max_abs": 0.5})):
        root = {"quantize": {"on_failure": "fp32", "keep_float": [], "fallback_tolerance": fallback},
                "precision": {"name": "int8", "tolerance": {"max_abs": None}}}
        run = SimpleNamespace(attempts=[], result=lambda stage: {}, status="pass")
        assert repair(root, run, "quantize", PipelineError("broke", stage="quantize"), logging.getLogger())
        assert run.status == "fallback" and root["precision"]["tolerance"] == expected
