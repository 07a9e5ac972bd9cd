"""Examples from files a user has: .npz/.npy arrays of the part's inputs, or images and .wav
recordings (files or folders of them) taken through the part's own raw preprocessing, the
steps its artifact carries (or its raw.reference, the app's Python)."""
from __future__ import annotations

import wave
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from pipelines.errors import PipelineError

from .tensors import as_examples

ARRAYS = (".npz", ".npy")
IMAGES = (".png", ".jpg", ".jpeg", ".bmp")
AUDIO = (".wav",)
KNOWN = ARRAYS + IMAGES + AUDIO


def expand(paths: list[str]) -> list[Path]:
    """The files named, each folder replaced by the known files inside it (sorted, recursive)."""
    files: list[Path] = []
    for name in paths:
        path = Path(name).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in KNOWN)
            if not found:
                raise PipelineError(f"calibration folder {path} holds no {'/'.join(KNOWN)} files",
                                    fix="point calibration.files at a folder of images, .wav or .npz files")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise PipelineError(f"calibration file {path} does not exist", fix="fix the path in calibration.files")
    return files


def examples_from_files(paths: list[str], specs: list[Mapping[str, Any]], raw, transform: str
                        ) -> tuple[dict[str, np.ndarray], str]:
    """{input: (N, *shape)} from the files, and where they came from in a few words."""
    if not paths:
        raise PipelineError("calibration.source=files but calibration.files is empty",
                            fix="list .npz/.npy files, images or .wav files (or folders of them) in "
                                "calibration.files")
    files = expand(paths)
    samples = [f for f in files if f.suffix.lower() not in ARRAYS]
    chunks = [_arrays(f, specs) for f in files if f.suffix.lower() in ARRAYS]
    if samples:
        chunks.append(_through_preprocessing(samples, specs, raw, transform))
    joined = {spec["name"]: np.concatenate([chunk[spec["name"]] for chunk in chunks]) for spec in specs}
    kinds = sorted({f.suffix.lower() for f in files})
    how = f", through the part's raw {'reference' if transform == 'reference' else 'steps'}" if samples else ""
    return joined, f"{len(files)} files ({', '.join(kinds)}){how}"


def _arrays(path: Path, specs) -> dict[str, np.ndarray]:
    try:
        loaded = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise PipelineError(f"calibration file {path} is not a readable .npz/.npy ({exc})",
                            fix="save it with numpy.savez / numpy.save") from exc
    arrays = dict(loaded) if path.suffix.lower() == ".npz" else {specs[0]["name"]: loaded}
    return as_examples(arrays, specs, str(path))


def _through_preprocessing(files: list[Path], specs, raw, transform: str) -> dict[str, np.ndarray]:
    """Each file as the app's raw input (bytes of an image, a .wav's waveform), then the part's
    preprocessing: to the part's inputs."""
    if raw is None or not raw.get("inputs"):
        raise PipelineError(f"calibration.files has images or recordings ({files[0].name}, ...), but the part "
                            "has no raw: section saying how they become its inputs",
                            fix="add raw: {inputs: [...], preprocess: [...]} to the part (see README, "
                                "'Raw inputs'), or give .npz arrays of its inputs")
    if len(raw.inputs) != 1:
        raise PipelineError(f"calibration from files needs a part with one raw input, it has "
                            f"{[s.name for s in raw.inputs]}", fix="give .npz arrays of the part's inputs")
    source = dict(raw.inputs[0])
    preprocess = _reference(raw, specs) if transform == "reference" else _steps(raw, specs)
    rows = [preprocess({source["name"]: _raw_value(f, source, raw)}) for f in files]
    return as_examples({s["name"]: np.concatenate([np.asarray(r[s["name"]])[None] for r in rows])
                        for s in specs}, specs, f"the preprocessed {files[0].parent}")


def _steps(raw, specs):
    """The part's raw.preprocess steps as one onnxruntime graph, run as the artifact runs them."""
    from ..formats.onnx_session import session
    from ..processing import app_model, build

    steps = [build(entry, f"raw.preprocess[{i}]") for i, entry in enumerate(raw.preprocess)]
    model = app_model([dict(s) for s in raw.inputs], steps, [s["name"] for s in specs])
    graph = session(model)
    names = [o.name for o in graph.get_outputs()]
    return lambda feed: dict(zip(names, graph.run(None, feed)))


def _reference(raw, specs):
    from .raw import reference

    if not raw.get("reference"):
        raise PipelineError("calibration.transform=reference but the part has no raw.reference",
                            fix="use calibration.transform=steps (the artifact's own preprocessing)")
    return reference(raw, [dict(s) for s in raw.inputs])


def _raw_value(path: Path, spec: Mapping[str, Any], raw) -> np.ndarray:
    if path.suffix.lower() in IMAGES:
        if spec["dtype"] != "uint8":
            raise PipelineError(f"{path.name} is an image, but the part's raw input '{spec['name']}' is "
                                f"{spec['dtype']}, not encoded bytes (uint8)", fix="give files the raw input takes")
        return np.frombuffer(path.read_bytes(), np.uint8)
    if spec["dtype"] != "float32":
        raise PipelineError(f"{path.name} is a recording, but the part's raw input '{spec['name']}' is "
                            f"{spec['dtype']}, not a float32 waveform", fix="give files the raw input takes")
    return _fitted(_waveform(path, _sample_rate(raw)), spec)


def _sample_rate(raw) -> int | None:
    return next((int(step["sample_rate"]) for step in raw.preprocess if "sample_rate" in step), None)


def _waveform(path: Path, rate: int | None) -> np.ndarray:
    """A PCM .wav as float32 in [-1, 1], channels averaged to mono."""
    try:
        with wave.open(str(path), "rb") as audio:
            frames, width, channels = audio.readframes(audio.getnframes()), audio.getsampwidth(), audio.getnchannels()
            found = audio.getframerate()
    except (wave.Error, EOFError) as exc:
        raise PipelineError(f"{path} is not a PCM .wav file ({exc})", fix="convert it to 16-bit PCM .wav") from exc
    if rate is not None and found != rate:
        raise PipelineError(f"{path} is sampled at {found} Hz, the part's preprocessing expects {rate} Hz",
                            fix=f"resample it to {rate} Hz (e.g. sox in.wav -r {rate} out.wav)")
    if width not in (1, 2, 4):
        raise PipelineError(f"{path} has {8 * width}-bit samples", fix="convert it to 16-bit PCM .wav")
    dtype = {1: np.uint8, 2: np.int16, 4: np.int32}[width]
    samples = np.frombuffer(frames, dtype).astype(np.float64)
    samples = (samples - 128) / 128 if width == 1 else samples / float(np.iinfo(dtype).max + 1)
    return samples.reshape(-1, channels).mean(axis=1).astype(np.float32)


def _fitted(waveform: np.ndarray, spec: Mapping[str, Any]) -> np.ndarray:
    """The waveform in the raw input's shape: [..., samples], cut or zero-padded to a fixed length."""
    shape = list(spec["shape"])
    if str(len(shape) - 1) in {str(d) for d in spec.get("dynamic") or {}}:
        return waveform.reshape([1] * (len(shape) - 1) + [-1])
    length = shape[-1]
    fitted = np.zeros(length, np.float32)
    fitted[:min(length, len(waveform))] = waveform[:length]
    return fitted.reshape(shape)
