"""Keyword-spotting ResNet on (B, 1, 64, 101) log-mel spectrograms, 12 classes.

The synthetic task lives in waveform space: one-second 16 kHz clips (16000 samples in [-1, 1]),
each class a fixed pattern of two or three tone or chirp bursts in three time slots (`PATTERNS`),
every example with a random gain, time shift, burst phases, small frequency and length jitter and
white noise. The training code turns waveforms into features with `log_mel` (models/audio_features.py,
plain numpy, torchaudio's conventions: see its docstring and `FEATURES`), and the model is trained
on those features. So there are two views of the same held-out examples:

  test_split()      {"inputs": {"mel": (N, 1, 1, 64, 101) float32}, "labels": (N,) int64}
  test_waveforms()  {"inputs": {"waveform": (N, 1, 16000) float32}, "labels": (N,) int64}

and `preprocess_waveform(waveform)` is the training code's preprocessing of one example.
`python -m models.kws checkpoints/kws_resnet.pt` trains it deterministically.
"""
from __future__ import annotations

import pathlib

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from models.audio_features import FEATURES, log_mel, mel_filterbank  # noqa: F401  (re-exported)
from models.checkpoint_io import fit, intra_op_threads, main, save_atomic
from models.splits import TEST, TRAIN, generator

N_MELS = FEATURES["n_mels"]
N_FRAMES = FEATURES["n_frames"]
SAMPLE_RATE = FEATURES["sample_rate"]
N_SAMPLES = FEATURES["n_samples"]

# Each class: bursts (slot, start Hz, end Hz), a tone when start == end, else a linear chirp.
# Slots start at SLOT_ONSETS seconds (before the example's shift) and last ~BURST_SECONDS.
SLOT_ONSETS = (0.14, 0.40, 0.66)
BURST_SECONDS = 0.20
PATTERNS = (
    ((0, 400, 400), (1, 1100, 1100)),
    ((0, 1100, 1100), (1, 400, 400)),
    ((0, 700, 1600), (2, 700, 700)),
    ((0, 1600, 700), (2, 700, 700)),
    ((0, 2300, 2300), (1, 2300, 2300), (2, 2300, 2300)),
    ((0, 3200, 3200), (1, 1100, 1100), (2, 3200, 3200)),
    ((1, 4500, 4500), (2, 400, 400)),
    ((0, 400, 2300), (1, 2300, 400)),
    ((0, 700, 700), (1, 3200, 3200), (2, 700, 700)),
    ((1, 1600, 1600), (2, 4500, 2300)),
    ((0, 5500, 5500), (2, 1100, 1100)),
    ((0, 2300, 3200), (1, 1600, 1600), (2, 2300, 3200)),
)
NUM_CLASSES = len(PATTERNS)
MAX_SHIFT = 0.08          # seconds, uniform in [-MAX_SHIFT, MAX_SHIFT]
PEAK = (0.1, 0.5)         # burst amplitude range (log-uniform)
NOISE = (0.005, 0.03)     # white-noise standard deviation range (log-uniform)
RAMP = 0.015              # raised-cosine attack and release, seconds


class ResidualBlock(nn.Module):
    """Two 3x3 conv + BatchNorm layers with an identity or 1x1-projection shortcut."""

    def __init__(self, *, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class KwsResNet(nn.Module):
    """Strided stem + max pool, residual stages that double channels and halve resolution, avg pool, linear.

    Input ``(B, 1, 64, 101)`` float mel spectrogram; output ``(B, num_classes)`` logits.
    """

    def __init__(self, *, num_classes: int = 12, channels: int = 16, n_blocks: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, channels, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        blocks = []
        width = channels
        for i in range(n_blocks):
            out = channels * 2**i
            blocks.append(ResidualBlock(in_channels=width, out_channels=out, stride=1 if i == 0 else 2))
            width = out
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def build(config: dict) -> nn.Module:
    """Rebuild the model from the ``config`` dict stored in the checkpoint."""
    return KwsResNet(**config)


def _table() -> np.ndarray:
    """PATTERNS as an array (classes, 3 slots, [active, start Hz, end Hz])."""
    table = np.zeros((NUM_CLASSES, len(SLOT_ONSETS), 3))
    for k, bursts in enumerate(PATTERNS):
        for slot, f0, f1 in bursts:
            table[k, slot] = (1.0, f0, f1)
    return table


def _waveforms(size: int, gen: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`size` random examples: float32 waveforms (size, 16000) in [-1, 1] and int64 labels (size,).

    All randomness comes from `gen` (drawn in a fixed order), the synthesis is plain numpy (float64).
    """
    slots = len(SLOT_ONSETS)
    labels = torch.randint(0, NUM_CLASSES, (size,), generator=gen).numpy()
    shift = (2 * torch.rand(size, 1, generator=gen).double().numpy() - 1) * MAX_SHIFT
    peak = np.exp(np.log(PEAK[0]) + np.log(PEAK[1] / PEAK[0]) * torch.rand(size, 1, generator=gen).double().numpy())
    phase = 2 * np.pi * torch.rand(size, slots, generator=gen).double().numpy()
    detune = 1 + 0.03 * (2 * torch.rand(size, slots, generator=gen).double().numpy() - 1)
    length = BURST_SECONDS * (1 + 0.1 * (2 * torch.rand(size, slots, generator=gen).double().numpy() - 1))
    sigma = np.exp(np.log(NOISE[0]) + np.log(NOISE[1] / NOISE[0]) * torch.rand(size, 1, generator=gen).double().numpy())
    noise = torch.randn(size, N_SAMPLES, generator=gen).double().numpy()

    table = _table()
    x = sigma * noise                                                  # (size, 16000)
    for i in range(size):
        for slot, (active, f_start, f_end) in enumerate(table[labels[i]]):
            if not active:
                continue
            onset, d = SLOT_ONSETS[slot] + shift[i, 0], length[i, slot]
            a, b = f_start * detune[i, slot], f_end * detune[i, slot]
            n = np.arange(max(0, int(np.ceil(onset * SAMPLE_RATE))), min(N_SAMPLES, int(np.ceil((onset + d) * SAMPLE_RATE))))
            tau = n / SAMPLE_RATE - onset                              # seconds into the burst, [0, d)
            ramp = np.clip(np.minimum(tau, d - tau) / RAMP, 0.0, 1.0)
            envelope = 0.5 - 0.5 * np.cos(np.pi * ramp)                # raised-cosine attack and release
            chirp = np.sin(2 * np.pi * (a * tau + (b - a) * tau**2 / (2 * d)) + phase[i, slot])  # a -> b Hz
            x[i, n] += peak[i, 0] * envelope * chirp
    return np.clip(x, -1.0, 1.0).astype(np.float32), labels.astype(np.int64)


def _batch(size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`size` random examples as the model takes them: log-mel (size, 1, 64, 101) and labels (size,)."""
    waveforms, labels = _waveforms(size, gen)
    return torch.from_numpy(log_mel(waveforms)[:, None]), torch.from_numpy(labels)


def _examples(split: int, samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Waveform examples (N, 1, 16000) of the split and seed, and their labels (N,)."""
    waveforms, labels = _waveforms(samples, generator(split, seed))
    return waveforms[:, None], labels


def preprocess_waveform(waveform: np.ndarray) -> dict[str, np.ndarray]:
    """The training code's preprocessing of one example: waveform (16000,) or (1, 16000) float32 in
    [-1, 1] at 16 kHz -> {"mel": float32 (1, 1, 64, 101)} = log_mel(waveform)."""
    x = np.asarray(waveform, np.float32).reshape(-1)
    if x.shape != (N_SAMPLES,):
        raise ValueError(f"expected one waveform of {N_SAMPLES} samples, got shape {np.shape(waveform)}")
    return {"mel": log_mel(x)[None, None]}


def train_waveforms(samples: int = 128, seed: int = 0) -> dict[str, np.ndarray]:
    """Calibration waveforms from the training distribution: {"waveform": float32 (N, 1, 16000)}."""
    return {"waveform": _examples(TRAIN, samples, seed)[0]}


def test_waveforms(samples: int = 256) -> dict:
    """Held-out waveforms and labels (the examples of test_split, same order):
    {"inputs": {"waveform": float32 (N, 1, 16000)}, "labels": int64 (N,)}."""
    waveforms, labels = _examples(TEST, samples, 0)
    return {"inputs": {"waveform": waveforms}, "labels": labels}


def train_split(samples: int = 128, seed: int = 0) -> dict[str, np.ndarray]:
    """Calibration inputs from the training distribution: {"mel": float32 (N, 1, 1, 64, 101)}, the
    log_mel of train_waveforms(samples, seed)."""
    return {"mel": log_mel(train_waveforms(samples, seed)["waveform"])[:, None]}


def test_split(samples: int = 256) -> dict:
    """Held-out inputs and labels: verification data, never drawn for calibration.
    {"inputs": {"mel": float32 (N, 1, 1, 64, 101)}, "labels": int64 (N,)}: log_mel(test_waveforms)."""
    data = test_waveforms(samples)
    return {"inputs": {"mel": log_mel(data["inputs"]["waveform"])[:, None]}, "labels": data["labels"]}


TRAIN_STEPS = 160
TRAIN_BATCH = 32
LEARNING_RATE = 5e-3
TRAIN_SEED = 1000  # the training stream: generator(TRAIN, 1000), apart from calibration's seeds


def make_checkpoint(path: str | pathlib.Path, steps: int = TRAIN_STEPS) -> None:
    """Train on fresh log-mel batches of the waveform task and write ``{"model_state_dict", "config"}``
    atomically (~15 s).

    One intra-op thread, restored afterwards: these small convolutions gain nothing from a second
    thread, and on a loaded machine OpenMP's barriers make two threads ~30x slower than one. Label
    smoothing keeps the logits moderate (|logit| < ~10): float16's rounding step at the logits of
    plain cross-entropy would exceed FP16's tolerance.
    """
    with intra_op_threads(1):
        torch.manual_seed(0)
        gen = generator(TRAIN, TRAIN_SEED)
        config = {"num_classes": NUM_CLASSES, "channels": 16, "n_blocks": 3}
        model = build(config)

        def loss_at(_step: int) -> torch.Tensor:
            x, y = _batch(TRAIN_BATCH, gen)
            return F.cross_entropy(model(x), y, label_smoothing=0.05)

        state = fit(model, torch.optim.Adam(model.parameters(), lr=LEARNING_RATE), steps, LEARNING_RATE, loss_at)
    save_atomic({"model_state_dict": state, "config": config}, pathlib.Path(path))


if __name__ == "__main__":
    main(make_checkpoint, __doc__)
