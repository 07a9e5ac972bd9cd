"""calibration=files from what a user has: folders of images and .wav recordings, taken through
the part's own raw preprocessing (the steps its artifact carries, or its raw.reference)."""
from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest

from pipelines.errors import PipelineError
from stages.support.sample_files import examples_from_files
from tests.conftest import compose_config


def part(model: str):
    return compose_config(f"model={model}").model.parts[0]


def write_wav(path: Path, samples: np.ndarray, rate: int = 16000, channels: int = 1) -> Path:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return path


@pytest.fixture(scope="module")
def digits():
    from models.digits import test_pngs

    return part("digits_cnn"), test_pngs()["inputs"]["png"][:12]


@pytest.mark.parametrize("transform", ["steps", "reference"])
def test_a_folder_of_pngs_becomes_the_parts_inputs(tmp_path, digits, transform):
    from models.digits import preprocess_png

    classifier, pngs = digits
    folder = tmp_path / "photos" / "nested"
    folder.mkdir(parents=True)
    for i, png in enumerate(pngs):
        (folder / f"{i:02d}.png").write_bytes(png)
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    examples, origin = examples_from_files([str(tmp_path / "photos")], list(classifier.inputs), classifier.raw,
                                           transform)
    assert examples["image"].shape == (12, 1, 1, 8, 8) and examples["image"].dtype == np.float32
    expected = np.stack([preprocess_png(png)["image"] for png in pngs])
    assert np.abs(examples["image"] - expected).max() < 1e-6
    assert origin.startswith("12 files (.png), through the part's raw")


def test_wav_recordings_are_cut_or_padded_to_the_raw_input(tmp_path):
    from models.kws import preprocess_waveform

    keyword = part("kws_resnet")
    rng = np.random.default_rng(0)
    short, long = rng.uniform(-0.5, 0.5, 12000), rng.uniform(-0.5, 0.5, 20000)
    write_wav(tmp_path / "a.wav", short)
    write_wav(tmp_path / "b.wav", np.repeat(long, 2), channels=2)  # stereo: the channels averaged
    examples, _ = examples_from_files([str(tmp_path)], list(keyword.inputs), keyword.raw, "steps")
    assert examples["mel"].shape == (2, 1, 1, 64, 101)
    waveforms = [np.pad(np.trunc(short * 32767) / 32768, (0, 4000)), np.trunc(long[:16000] * 32767) / 32768]
    for got, waveform in zip(examples["mel"], waveforms):
        assert np.abs(got - preprocess_waveform(waveform.astype(np.float32))["mel"]).max() < 2e-3  # onnxruntime STFT vs numpy


def test_files_the_part_cannot_take_are_named(tmp_path, digits):
    keyword = part("kws_resnet")
    write_wav(tmp_path / "fast.wav", np.zeros(8000), rate=8000)
    with pytest.raises(PipelineError, match="fast.wav is sampled at 8000 Hz, the part's preprocessing expects 16000"):
        examples_from_files([str(tmp_path / "fast.wav")], list(keyword.inputs), keyword.raw, "steps")
    classifier, pngs = digits
    (tmp_path / "x.png").write_bytes(pngs[0])
    tiny = part("tiny")
    with pytest.raises(PipelineError, match="has no raw: section") as info:
        examples_from_files([str(tmp_path / "x.png")], list(tiny.inputs), tiny.raw, "steps")
    assert ".npz" in info.value.fix
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PipelineError, match="holds no"):
        examples_from_files([str(empty)], list(classifier.inputs), classifier.raw, "steps")
