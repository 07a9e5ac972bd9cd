"""How class scores are judged: on the axis where the classes are, per position for dense maps."""
from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from pipelines.errors import PipelineError
from stages.support.fidelity import check, class_scores, judge, score_layout

IO = {"outputs": ["probs", "boxes", "logits"]}


def judged(eager: np.ndarray, artifact: np.ndarray, axis: int | None = None) -> dict:
    return judge([[eager]], [[artifact]], ["probs"], {"probs": axis}, None)


def test_declared_layouts_and_names_by_default():
    assert class_scores({"scores": None}, IO) == {"probs": None, "logits": None}
    assert class_scores({"scores": ["probs"]}, IO) == {"probs": None}
    part = OmegaConf.create({"scores": {"probs": {"axis": 1}, "missing": None}})
    assert class_scores(part, IO) == {"probs": 1}
    with pytest.raises(PipelineError, match="not a score layout") as info:
        class_scores({"scores": {"probs": 1}}, IO)
    assert "{probs: {axis: 1}}" in info.value.fix


@pytest.mark.parametrize(("shape", "axis", "expected"), [
    ((8, 10), None, 1), ((8, 5, 30), None, 2), ((1, 2, 6, 7), None, 1), ((1, 6, 7, 2), -1, 3)])
def test_the_class_axis_by_rank_or_declaration(shape, axis, expected):
    layout = score_layout(np.zeros(shape), axis)
    assert layout["axis"] == expected and layout["classes"] == shape[expected]
    assert layout["map"] == (expected < len(shape) - 1)


def test_one_class_or_a_vector_has_nothing_to_agree_on():
    assert score_layout(np.zeros((4, 1)), None) is None and score_layout(np.zeros(4), None) is None


def test_a_dense_map_is_judged_per_pixel_on_its_class_axis():
    """(1, 2, H, W) scores: class agreement per pixel, not argmax over the width."""
    rng = np.random.default_rng(0)
    eager = rng.standard_normal((1, 2, 16, 16)).astype(np.float32)
    artifact = eager.copy()
    artifact[0, :, :4, :] = artifact[0, ::-1, :4, :]  # the top quarter of the pixels swap classes
    report = judged(eager, artifact)
    assert report["scores"]["probs"]["axis"] == 1 and report["scores"]["probs"]["positions"] == 256
    assert report["top1_agreement"]["probs"] == pytest.approx(0.75)
    assert 0.5 < report["map_iou"]["probs"] < 0.75
    tolerance = OmegaConf.create({"max_abs": None, "mean_abs": None, "min_cosine": None,
                                  "min_top1_agreement": 0.98, "min_map_iou": None})
    passed, reason = check(report, tolerance)
    assert not passed and "75.00% (per position, 256 per sample, classes on axis 1) < 98%" in reason


def test_map_iou_is_judged_when_asked():
    eager = np.zeros((1, 3, 4, 4), np.float32)
    eager[0, 0] = 1.0
    eager[0, 1, :, :2] = 2.0  # eager: class 1 on the left half, class 0 on the right
    artifact = eager.copy()
    artifact[0, 1, :, 1] = 0.0  # one column of class 1 becomes class 0
    report = judged(eager, artifact)
    assert report["map_iou"]["probs"] == pytest.approx((8 / 12 + 4 / 8) / 2)
    tolerance = OmegaConf.create({"max_abs": None, "mean_abs": None, "min_cosine": None,
                                  "min_top1_agreement": None, "min_map_iou": 0.9})
    passed, reason = check(report, tolerance)
    assert not passed and "mean IoU of its class maps with eager's 58.33% < 90%" in reason


def test_channels_last_maps_declare_their_axis():
    rng = np.random.default_rng(1)
    eager = rng.standard_normal((2, 8, 8, 3))
    assert judged(eager, eager, axis=-1)["top1_agreement"]["probs"] == 1.0
    assert judged(eager, eager, axis=-1)["scores"]["probs"]["how"] == "declared"
    assert judged(eager, eager)["scores"]["probs"]["axis"] == 1  # the default would read the height


def corner_boxes(outputs, scale: float = 1.0) -> dict:
    """A decode step as a part names one: (N, K, 4) offsets from a fixed grid of anchors."""
    anchors = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [0, 20, 10, 30]], np.float64) * scale
    return {"boxes": anchors[None] + outputs["deltas"], "scores": outputs["logits"].max(-1)}


def test_boxes_are_judged_by_iou_after_the_apps_decode_step():
    deltas = np.zeros((2, 3, 4))
    logits = np.array([[[0.9], [0.1], [0.5]], [[0.2], [0.8], [0.7]]])
    shifted = deltas.copy()
    shifted[:, :, [0, 2]] += 5.0  # every box moves half its width: IoU 50/150
    decode = {"decode": {"_target_": "tests.test_fidelity.corner_boxes"}, "top": 2}
    report = judge([[deltas, logits]], [[shifted, logits]], ["deltas", "logits"], {}, None, boxes=decode)
    assert report["boxes"]["mean_iou"] == pytest.approx(1 / 3) and report["boxes"]["matched"] == 0.0
    assert report["boxes"]["top"] == 2
    tolerance = OmegaConf.create({"max_abs": None, "mean_abs": None, "min_cosine": None,
                                  "min_top1_agreement": None, "min_box_iou": 0.9})
    passed, reason = check(report, tolerance)
    assert not passed and "decoded boxes' mean IoU with eager's 33.33% (top 2 per example" in reason
    with pytest.raises(PipelineError, match="part.boxes.decode tests.test_fidelity.corner_boxes failed"):
        judge([[deltas, logits]], [[shifted, logits]], ["deltas", "logits"], {}, None,
              boxes={"decode": {"_target_": "tests.test_fidelity.corner_boxes", "wrong": 1}})


def test_integer_outputs_are_judged_equal_or_not_never_by_cosine():
    """A token id that changed is a wrong token, however close the two numbers (cosine of two
    long id sequences that differ in one place is still 0.9999)."""
    from stages.support.fidelity import compare

    eager = np.arange(100, 124, dtype=np.int64).reshape(1, 24)
    artifact = eager.copy()
    artifact[0, 15] += 1
    measured = compare(eager, artifact)
    assert measured["cosine"] > 0.9999 and measured["exact_match"] == pytest.approx(23 / 24)
    loose_floats = OmegaConf.create({"max_abs": None, "mean_abs": None, "min_cosine": 0.98,
                                     "min_top1_agreement": None})
    passed, reason = check({"outputs": {"token": measured}}, loose_floats)
    assert not passed
    assert reason == ("output 'token' (integers) equals eager's at 95.83% of its values < 100%; "
                      "the first differs at index [0, 15]")
    stated = OmegaConf.create({"max_abs": 0.0, "mean_abs": None, "min_cosine": None, "min_top1_agreement": 0.95})
    assert check({"outputs": {"token": measured}}, stated) == (True, "")  # a stated match rate, not max_abs
    assert "exact_match" not in compare(eager.astype(np.float32), artifact.astype(np.float32))


def test_fp32_is_judged_relative_to_the_outputs_scale():
    """Large logits carry a float program's reordering error in proportion (timm's mobilenetv4,
    logits up to 18: 1.24e-4 off); a wrong value at any scale is still refused."""
    fp32 = OmegaConf.merge(OmegaConf.create({"max_abs": None, "mean_abs": None, "max_rel": None,
                                             "min_cosine": None, "min_top1_agreement": None}),
                           OmegaConf.load("conf/precision/fp32.yaml").tolerance)
    rng = np.random.default_rng(0)
    eager = (18 * rng.standard_normal((4, 1000))).astype(np.float32)
    reordered = eager + rng.uniform(-1.3e-4, 1.3e-4, eager.shape).astype(np.float32)
    assert check(judge([[eager]], [[reordered]], ["logits"], {}, None), fp32)[0]
    wrong = eager.copy()
    wrong[0, 0] += 0.05
    passed, reason = check(judge([[eager]], [[wrong]], ["logits"], {}, None), fp32)
    assert not passed and "of its largest value > 0.0001" in reason
