"""Processing steps (stages/processing/): each step's ONNX agrees with its PyTorch module and with
the reference an app or a training script would use; plan() keeps in the app what a format or
target cannot hold."""
from __future__ import annotations

import io

import numpy as np
import onnxruntime as ort
import pytest
import torch

from pipelines.errors import PipelineError
from stages.processing import build, onnx_model, plan, uses_custom_ops

PNG = {"name": "png", "shape": [1], "dtype": "uint8", "dynamic": {"0": "bytes"}}


def run(model, feed: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    if uses_custom_ops(model):
        from onnxruntime_extensions import get_library_path

        options.register_custom_ops_library(get_library_path())
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"]).run(None, feed)


def png(pixels: np.ndarray) -> np.ndarray:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return np.frombuffer(buffer.getvalue(), np.uint8)


def chain(steps, value: torch.Tensor) -> torch.Tensor:
    for step in steps:
        value = step.torch()(value)
    return value


def test_image_steps_match_pil_and_their_pytorch_modules():
    from PIL import Image

    colour = np.random.default_rng(0).integers(0, 256, (10, 12, 3)).astype(np.uint8)
    steps = [build(s, "test") for s in [{"step": "decode_image", "colour": "gray"},
                                        {"step": "resize", "size": [8, 8]},
                                        {"step": "center_crop", "size": [6, 6]}, {"step": "scale"},
                                        {"step": "normalize", "mean": [0.5], "std": [0.25]},
                                        {"step": "layout"}]]
    out = run(onnx_model([PNG], steps, []), {"png": png(colour)})[0]
    gray = np.array(Image.fromarray(colour).convert("L"))[..., None]  # PIL's luma, as an app has it
    expected = chain(steps[1:], torch.from_numpy(gray)).numpy()
    assert out.shape == (1, 1, 6, 6) and np.abs(out - expected).max() < 1e-5


def test_rgb_decoding_keeps_the_channel_order():
    colour = np.random.default_rng(1).integers(0, 256, (4, 5, 3)).astype(np.uint8)
    for order, expected in (("rgb", colour), ("bgr", colour[..., ::-1])):
        decoded = run(onnx_model([PNG], [build({"step": "decode_image", "colour": order}, "t")], []),
                      {"png": png(colour)})[0]
        assert np.array_equal(decoded, expected), order


def test_log_mel_matches_a_float64_stft_in_both_forms():
    from stages.processing.audio import hann

    step = build({"step": "log_mel", "f_min": 20.0, "f_max": 8000.0}, "test")
    wave = (np.random.default_rng(2).standard_normal((1, 16000)) * 0.1).astype(np.float32)
    padded = np.pad(wave[0].astype(np.float64), 200, mode="reflect")
    frames = np.stack([padded[i * 160:i * 160 + 400] for i in range(101)]) * hann(400)
    expected = np.log(np.abs(np.fft.rfft(frames, axis=1)) ** 2 @ step.filters() + 1e-6).T
    spec = {"name": "waveform", "shape": [1, 16000], "dtype": "float32", "dynamic": {}}
    graph = run(onnx_model([spec], [step], []), {"waveform": wave})[0][0, 0]
    module = step.torch()(torch.from_numpy(wave)).numpy()[0, 0]
    assert np.abs(graph - expected).max() < 2e-5 and np.abs(module - expected).max() < 2e-5


def test_onnx_stft_operator_drifts_in_the_lowest_bands():
    """Why log_mel defaults to a DFT convolution: onnxruntime 1.31.1's STFT kernel loses
    precision where one or two bins feed a mel filter (documented in LogMel)."""
    conv, stft = (build({"step": "log_mel", "f_min": 20.0, "f_max": 8000.0, "dft": d}, "t") for d in ("conv", "stft"))
    spec = {"name": "waveform", "shape": [1, 16000], "dtype": "float32", "dynamic": {}}
    wave = {"waveform": (np.random.default_rng(1).standard_normal((1, 16000)) * 0.1).astype(np.float32)}
    exact, drift = (run(onnx_model([spec], [s], []), wave)[0] for s in (conv, stft))
    assert np.abs(exact - drift).max() > 1e-4


def test_topk_names_the_classes_in_onnx_and_gives_indices_in_pytorch():
    steps = [build({"step": "softmax"}, "t"), build({"step": "topk", "k": 2, "labels": ["a", "b", "c"]}, "t")]
    spec = {"name": "scores", "shape": [1, 3], "dtype": "float32", "dynamic": {}}
    scores, classes, labels = run(onnx_model([spec], steps, []), {"scores": np.array([[1, 3, 2]], np.float32)})
    assert classes.tolist() == [[1, 2]] and labels.tolist() == [["b", "c"]]
    values, indices = chain(steps, torch.tensor([[1.0, 3.0, 2.0]]))
    assert indices.tolist() == [[1, 2]] and np.allclose(values.numpy(), scores, atol=1e-6)
    assert steps[1].outputs("onnx") == ["top_scores", "top_classes", "top_labels"]
    assert steps[1].outputs("pte") == ["top_scores", "top_classes"]


def test_plan_keeps_what_a_format_or_target_cannot_hold_in_the_app():
    pre = [build(s, "t") for s in [{"step": "decode_image"}, {"step": "scale"}, {"step": "layout"}]]
    post = [build({"step": "softmax"}, "t")]
    assert plan(pre, post, "onnx", custom_ops=True) == ([], pre)
    assert plan(pre, post, "onnx", custom_ops=False) == (pre[:1], pre[1:])  # onnxruntime-web
    assert plan(pre, post, "pte", custom_ops=True) == (pre[:1], pre[1:])  # no decoder in a program


def test_an_unknown_step_or_parameter_is_named():
    with pytest.raises(PipelineError, match="unknown processing step 'blur'"):
        build({"step": "blur"}, "part 'p' raw.preprocess[0]")
    with pytest.raises(PipelineError, match="step decode_image: colour must be one of"):
        build({"step": "decode_image", "colour": "cmyk"}, "part 'p' raw.preprocess[0]")
