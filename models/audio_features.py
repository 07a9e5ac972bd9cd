"""Log-mel features in plain numpy, as a training script computes them (the keyword spotter's).

The conventions are torchaudio's MelSpectrogram(sample_rate=16000, n_fft=400, win_length=400,
hop_length=160, f_min=20, f_max=8000, n_mels=64, window_fn=hann_window (periodic), power=2,
center=True, pad_mode="reflect", norm=None, mel_scale="htk") followed by log(mel + 1e-6); torchaudio
is not needed: `mel_filterbank` builds the same matrix as torchaudio.functional.melscale_fbanks.
A graph that embeds `mel_filterbank(...)` and follows the steps of `log_mel` computes the same
features (see tests/test_zoo_raw.py for the torch.stft formulation).
"""
from __future__ import annotations

import numpy as np

FEATURES = {
    "sample_rate": 16000,
    "n_samples": 16000,      # one second per example
    "n_fft": 400,            # 25 ms
    "win_length": 400,       # = n_fft: the window is not zero-padded
    "hop_length": 160,       # 10 ms
    "window": "hann",        # periodic: 0.5 - 0.5 cos(2 pi n / 400), n = 0..399 (torch.hann_window(400))
    "center": True,          # n_fft // 2 = 200 samples of padding on both sides...
    "pad_mode": "reflect",   # ...mirrored without repeating the edge sample (np.pad / torch "reflect")
    "power": 2.0,            # |X|^2
    "n_freqs": 201,          # n_fft // 2 + 1 one-sided bins, 0..8000 Hz
    "n_mels": 64,
    "f_min": 20.0,
    "f_max": 8000.0,
    "mel_scale": "htk",      # mel = 2595 log10(1 + f / 700)
    "mel_norm": None,        # triangles peak at 1, no area (Slaney) normalisation
    "log_offset": 1e-6,      # features = log(mel + 1e-6), natural log
    "n_frames": 101,         # 1 + 16000 // 160
}


def hz_to_mel(freq: np.ndarray | float) -> np.ndarray:
    """HTK mel scale: 2595 * log10(1 + f / 700)."""
    return 2595.0 * np.log10(1.0 + np.asarray(freq, np.float64) / 700.0)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
    """Inverse of hz_to_mel: 700 * (10 ** (mel / 2595) - 1)."""
    return 700.0 * (10.0 ** (np.asarray(mel, np.float64) / 2595.0) - 1.0)


def mel_filterbank(n_freqs: int = 201, n_mels: int = 64, sample_rate: int = 16000, f_min: float = 20.0,
                   f_max: float = 8000.0) -> np.ndarray:
    """Triangular mel filters, float32 (n_freqs, n_mels): power spectrum (..., n_freqs) @ fb = mel energies.

    torchaudio.functional.melscale_fbanks(n_freqs, f_min, f_max, n_mels, sample_rate, norm=None,
    mel_scale="htk"): bin frequencies linspace(0, sample_rate // 2, n_freqs); n_mels + 2 edges
    equally spaced in HTK mel between f_min and f_max; filter m rises linearly from edge m to 1 at
    edge m + 1 and falls to 0 at edge m + 2; no area normalisation. Computed in float64, returned as
    float32 (torchaudio computes it in float32: the two differ by < 1e-5).
    """
    all_freqs = np.linspace(0.0, sample_rate // 2, n_freqs)
    edges = mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))
    widths = np.diff(edges)                               # (n_mels + 1,)
    slopes = edges[None, :] - all_freqs[:, None]          # (n_freqs, n_mels + 2)
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    return np.maximum(0.0, np.minimum(down, up)).astype(np.float32)


def hann_window(length: int = 400) -> np.ndarray:
    """Periodic Hann window (torch.hann_window(length, periodic=True)), float64."""
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(length) / length)


def power_spectrogram(waveform: np.ndarray, n_fft: int = 400, hop_length: int = 160) -> np.ndarray:
    """|STFT|^2, float64 (..., n_fft // 2 + 1, frames): centred frames (reflect padding of n_fft // 2),
    periodic Hann window of n_fft samples, one-sided rfft, unnormalised."""
    x = np.asarray(waveform, np.float64)
    pad = [(0, 0)] * (x.ndim - 1) + [(n_fft // 2, n_fft // 2)]
    x = np.pad(x, pad, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(x, n_fft, axis=-1)[..., ::hop_length, :]
    spectrum = np.fft.rfft(frames * hann_window(n_fft), n=n_fft, axis=-1)  # (..., frames, n_freqs)
    power = spectrum.real ** 2 + spectrum.imag ** 2
    return np.swapaxes(power, -1, -2)


def log_mel(waveform: np.ndarray) -> np.ndarray:
    """Log-mel features of one-second 16 kHz waveforms: float32 (..., 16000) -> float32 (..., 64, 101).

    Exactly these conventions (FEATURES):
      - sample_rate 16000; the input is float audio in [-1, 1], any leading dims;
      - center=True: REFLECT padding of n_fft // 2 = 200 samples on both sides (np.pad mode
        "reflect", torch.stft pad_mode="reflect": the edge sample is not repeated), so 16000 samples
        give 1 + 16000 // 160 = 101 frames; frame t covers padded samples [160 t, 160 t + 400);
      - n_fft 400 (25 ms), win_length 400, hop 160 (10 ms), periodic Hann window
        0.5 - 0.5 cos(2 pi n / 400) (torch.hann_window(400, periodic=True));
      - one-sided DFT (201 bins, 0..8000 Hz), unnormalised; power spectrum |X|^2;
      - 64 mel bands: mel_filterbank() (HTK mel scale 2595 log10(1 + f / 700), f_min 20 Hz,
        f_max 8000 Hz, triangular filters peaking at 1, no area normalisation: torchaudio's
        melscale_fbanks(norm=None, mel_scale="htk")); mel = power^T @ fb;
      - natural log(mel + 1e-6); output (..., n_mels=64, frames=101), mel bands first.
    Computed in float64 and returned as float32; each example's features are the same whatever
    batch it is computed in.
    """
    x = np.asarray(waveform)
    if x.shape[-1] != FEATURES["n_samples"]:
        raise ValueError(f"expected {FEATURES['n_samples']} samples on the last axis, got {x.shape[-1]}")
    power = power_spectrogram(x, FEATURES["n_fft"], FEATURES["hop_length"])       # (..., 201, 101)
    fb = mel_filterbank(FEATURES["n_freqs"], FEATURES["n_mels"], FEATURES["sample_rate"], FEATURES["f_min"],
                        FEATURES["f_max"]).astype(np.float64)
    # numpy's own sum-of-products loop, not BLAS: each example's features do not depend on the
    # batch it came in (BLAS blocks, and so rounds, by the matrix sizes), and no BLAS thread pool
    # fights the training loop's threads for a busy machine's cores
    mel = np.einsum("...ft,fm->...mt", power, fb)                                  # (..., 64, 101)
    return np.log(mel + FEATURES["log_offset"]).astype(np.float32)
