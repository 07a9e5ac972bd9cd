"""1-D CNN that classifies 750-sample biosignal windows (3 s at 250 Hz): background vs. seizure-like."""
from __future__ import annotations

import pathlib

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from models.checkpoint_io import main, save_atomic
from models.splits import TEST, TRAIN, generator

N_SAMPLES = 750
SAMPLE_RATE = 250
LIGHTNING_VERSION = "2.4.0"
_MODEL_KEYS = ("in_channels", "num_classes", "channels", "kernel_size", "dropout")


class ConvBlock(nn.Sequential):
    """Conv1d (same padding, no bias) -> BatchNorm1d -> ReLU -> MaxPool1d(2)."""

    def __init__(self, *, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__(
            nn.Conv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm1d(out_channels),
            nn.ReLU(),
            nn.MaxPool1d(2),
        )


class BiosignalCNN(nn.Module):
    """Stack of ConvBlocks, adaptive average pool, dropout, linear.

    Input ``(B, in_channels, 750)`` float; output ``(B, num_classes)`` logits.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        num_classes: int = 2,
        channels: list[int] | tuple[int, ...] = (16, 32, 64),
        kernel_size: int = 7,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        widths = [in_channels, *channels]
        self.features = nn.Sequential(
            *(ConvBlock(in_channels=a, out_channels=b, kernel_size=kernel_size) for a, b in zip(widths, widths[1:]))
        )
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.pool(self.features(x)), 1)
        return self.fc(self.dropout(x))


def build(config: dict) -> nn.Module:
    """Rebuild the model from the checkpoint's ``hyper_parameters`` (training-only keys are ignored)."""
    return BiosignalCNN(**{k: config[k] for k in _MODEL_KEYS if k in config})


def _batch(size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Label 0: smoothed noise plus a slow rhythm. Label 1: the same plus a 1-2.5 s burst of 3-5 Hz spike-waves."""
    t = torch.arange(N_SAMPLES, dtype=torch.float32) / SAMPLE_RATE
    noise = torch.randn(size, 1, N_SAMPLES, generator=gen)
    background = F.avg_pool1d(noise, 5, stride=1, padding=2, count_include_pad=False)
    freq = 8.0 + 4.0 * torch.rand(size, 1, 1, generator=gen)
    x = background + 0.3 * torch.sin(2 * torch.pi * freq * t + 6.3 * torch.rand(size, 1, 1, generator=gen))
    labels = torch.randint(0, 2, (size,), generator=gen)
    rate = 3.0 + 2.0 * torch.rand(size, 1, 1, generator=gen)
    phase = torch.remainder(rate * t, 1.0)
    spikes = 3.0 * torch.exp(-((phase - 0.1) ** 2) / 0.002) - 1.0 * torch.exp(-((phase - 0.45) ** 2) / 0.02)
    start = torch.rand(size, 1, 1, generator=gen) * 1.5
    length = 1.0 + 1.5 * torch.rand(size, 1, 1, generator=gen)
    window = ((t >= start) & (t < start + length)).float()
    x = x + labels.view(-1, 1, 1) * window * spikes
    return x, labels


def train_split(samples: int = 128, seed: int = 0) -> dict[str, np.ndarray]:
    """Calibration windows (N, 1, 1, 750) from the training distribution."""
    x, _ = _batch(samples, generator(TRAIN, seed))
    return {"signal": x[:, None].numpy()}


def test_split(samples: int = 512) -> dict:
    """Held-out windows and labels: verification data, never drawn for calibration."""
    x, labels = _batch(samples, generator(TEST))
    return {"inputs": {"signal": x[:, None].numpy()}, "labels": labels.numpy()}


def make_checkpoint(path: str | pathlib.Path) -> None:
    """Train briefly on the synthetic burst task and write a Lightning-style checkpoint atomically."""
    torch.manual_seed(0)
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    hparams = {"in_channels": 1, "num_classes": 2, "channels": [16, 32, 64], "kernel_size": 7, "dropout": 0.1,
               "lr": 3e-3}
    model = build(hparams)
    opt = torch.optim.Adam(model.parameters(), lr=hparams["lr"])
    model.train()
    steps = 100
    for _ in range(steps):
        x, y = _batch(32, gen)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    checkpoint = {
        "state_dict": {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()},
        "hyper_parameters": hparams,
        "pytorch-lightning_version": LIGHTNING_VERSION,
        "epoch": 0,
        "global_step": steps,
    }
    save_atomic(checkpoint, pathlib.Path(path))


if __name__ == "__main__":
    main(make_checkpoint, __doc__)
