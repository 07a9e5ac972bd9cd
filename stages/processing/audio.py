"""Audio steps: a waveform to the log-mel spectrogram a model was trained on."""
from __future__ import annotations

import numpy as np
import torch
from onnx import numpy_helper
from torch import nn

from . import Step, register
from .graphs import TextStep


def hann(length: int) -> np.ndarray:
    """The periodic Hann window (torch.hann_window(periodic=True))."""
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(length) / length)).astype(np.float32)


def htk_mel_filterbank(n_freqs: int, n_mels: int, sample_rate: int, f_min: float, f_max: float) -> np.ndarray:
    """(n_freqs, n_mels) triangular filters evenly spaced on the HTK mel scale, not area-normalised
    (torchaudio's melscale_fbanks(norm=None, mel_scale="htk"))."""
    def mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    freqs = np.linspace(0, sample_rate // 2, n_freqs)
    points = 700.0 * (10 ** (np.linspace(mel(f_min), mel(f_max), n_mels + 2) / 2595.0) - 1.0)
    slopes = points[None, :] - freqs[:, None]  # (n_freqs, n_mels + 2)
    widths = np.diff(points)
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    return np.maximum(0.0, np.minimum(down, up)).astype(np.float32)


def dft_basis(window: np.ndarray, n_freqs: int) -> np.ndarray:
    """(2 * n_freqs, 1, n_fft): the windowed DFT's real then imaginary rows, as conv kernels."""
    n_fft = len(window)
    angles = 2 * np.pi * np.outer(np.arange(n_freqs), np.arange(n_fft)) / n_fft
    return (np.concatenate([np.cos(angles), -np.sin(angles)]) * window).astype(np.float32)[:, None, :]


class _LogMel(nn.Module):
    """The STFT as a strided convolution with the windowed DFT basis (ExecuTorch has no complex
    FFT), then power, mel filters and log."""

    def __init__(self, window: np.ndarray, filters: np.ndarray, hop: int, offset: float):
        super().__init__()
        n_fft, n_freqs = len(window), filters.shape[0]
        self.register_buffer("basis", torch.tensor(dft_basis(window, n_freqs)))
        self.register_buffer("filters", torch.tensor(filters))
        self.hop, self.pad, self.offset, self.n_freqs = hop, n_fft // 2, offset, n_freqs

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        signal = waveform.reshape(1, 1, -1)
        padded = nn.functional.pad(signal, (self.pad, self.pad), mode="reflect")
        spectrum = nn.functional.conv1d(padded, self.basis, stride=self.hop)[0]  # (2F, frames)
        power = spectrum[:self.n_freqs] ** 2 + spectrum[self.n_freqs:] ** 2
        mel = torch.matmul(power.transpose(0, 1), self.filters)  # (frames, mels)
        return torch.log(mel + self.offset).transpose(0, 1).reshape(1, 1, self.filters.shape[1], -1)


@register
class LogMel(Step):
    """waveform (float [1, samples]) -> log-mel (float [1, 1, n_mels, frames]): reflect-padded by
    n_fft//2 each side (center), periodic Hann window, |STFT|^2, HTK mel filters (not
    area-normalised) between f_min and f_max, log(mel + offset). Standard ONNX operators (they
    run in onnxruntime-web too); PyTorch: the same DFT convolution.

    dft: `conv` (the windowed DFT as a strided Conv: exact to ~3e-6 against float64, ~630 KB of
    kernels for n_fft 400) or `stft` (ONNX's STFT operator, 1.6 KB; onnxruntime 1.31.1's kernel
    drifts by up to ~7e-4 in the log-mel of the lowest bands, where one or two FFT bins feed a
    filter: enough to move fp32 logits past a 1e-4 tolerance)."""

    name = "log_mel"

    def __init__(self, sample_rate: int = 16000, n_fft: int = 400, hop: int = 160, n_mels: int = 64,
                 f_min: float = 0.0, f_max: float | None = None, offset: float = 1e-6, dft: str = "conv"):
        if dft not in ("conv", "stft"):
            raise TypeError(f"dft must be conv or stft, not {dft!r}")
        super().__init__(sample_rate=sample_rate, n_fft=n_fft, hop=hop, n_mels=n_mels, f_min=f_min,
                         f_max=f_max if f_max is not None else sample_rate / 2, offset=offset, dft=dft)

    def filters(self) -> np.ndarray:
        p = self.params
        return htk_mel_filterbank(p["n_fft"] // 2 + 1, p["n_mels"], p["sample_rate"], p["f_min"], p["f_max"])

    def onnx(self) -> list:
        p = self.params

        def build(step, types):
            filters = self.filters()
            tensors = [numpy_helper.from_array(filters, "mel_filters")]
            pad = p["n_fft"] // 2
            if p["dft"] == "conv":  # (1, 1, samples) -> (1, 2F, frames): real rows, then imaginary
                tensors.append(numpy_helper.from_array(dft_basis(hann(p["n_fft"]), filters.shape[0]), "dft"))
                spectrum = f"""
                shape = Constant <value = int64[3] {{1, 1, -1}}> ()
                signal = Reshape ({step.input_names[0]}, shape)
                pads = Constant <value = int64[6] {{0, 0, {pad}, 0, 0, {pad}}}> ()
                padded = Pad <mode = "reflect"> (signal, pads)
                parts = Conv <strides = [{p['hop']}]> (padded, dft)
                squared = Mul (parts, parts)
                real, imaginary = Split <axis = 1, num_outputs = 2> (squared)
                summed = Add (real, imaginary)
                power = Transpose <perm = [0, 2, 1]> (summed)"""
            else:  # (1, samples, 1) -> (1, frames, F, 2)
                tensors.append(numpy_helper.from_array(hann(p["n_fft"]), "hann_window"))
                spectrum = f"""
                shape = Constant <value = int64[2] {{1, -1}}> ()
                signal = Reshape ({step.input_names[0]}, shape)
                pads = Constant <value = int64[4] {{0, {pad}, 0, {pad}}}> ()
                padded = Pad <mode = "reflect"> (signal, pads)
                last = Constant <value = int64[1] {{-1}}> ()
                frames_in = Unsqueeze (padded, last)
                step_size = Constant <value = int64 {{{p['hop']}}}> ()
                length = Constant <value = int64 {{{p['n_fft']}}}> ()
                complex = STFT <onesided = 1> (frames_in, step_size, hann_window, length)
                squared = Mul (complex, complex)
                power = ReduceSum <keepdims = 0> (squared, last)"""
            body = spectrum + f"""
                mel = MatMul (power, mel_filters)
                offset = Constant <value = float {{{p['offset']}}}> ()
                shifted = Add (mel, offset)
                logmel = Log (shifted)
                mels_first = Transpose <perm = [0, 2, 1]> (logmel)
                one = Constant <value = int64[1] {{1}}> ()
                {step.output_names[0]} = Unsqueeze (mels_first, one)"""
            return f"float[1,1,{p['n_mels']},frames] {step.output_names[0]}", body, tensors

        return [TextStep("LogMel", ["waveform"], ["log_mel"], build)]

    def torch(self) -> nn.Module:
        p = self.params
        return _LogMel(hann(p["n_fft"]), self.filters(), p["hop"], p["offset"])
