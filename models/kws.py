"""Keyword-spotting ResNet on (B, 1, 64, 101) log-mel spectrograms, 12 classes."""
from __future__ import annotations

import pathlib

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from models.checkpoint_io import main, save_atomic
from models.splits import TEST, TRAIN, generator

N_MELS = 64
N_FRAMES = 101


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


def _class_templates(num_classes: int, gen: torch.Generator) -> torch.Tensor:
    """One spectrogram template per class: two Gaussian blobs at class-specific (freq, time) spots."""
    f = torch.arange(N_MELS, dtype=torch.float32)[:, None]
    t = torch.arange(N_FRAMES, dtype=torch.float32)[None, :]
    templates = torch.zeros(num_classes, N_MELS, N_FRAMES)
    for k in range(num_classes):
        for _ in range(2):
            fc = torch.randint(4, N_MELS - 4, (1,), generator=gen).float()
            tc = torch.randint(15, N_FRAMES - 15, (1,), generator=gen).float()
            templates[k] += torch.exp(-((f - fc) ** 2) / 18.0 - ((t - tc) ** 2) / 60.0)
    return templates


def _batch(templates: torch.Tensor, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random classes; template with a small random time shift, random gain, and Gaussian noise."""
    labels = torch.randint(0, templates.shape[0], (size,), generator=gen)
    shifts = torch.randint(-6, 7, (size, 1, 1), generator=gen)
    time_index = torch.remainder(torch.arange(N_FRAMES) - shifts, N_FRAMES).expand(-1, N_MELS, -1)
    x = templates[labels].gather(-1, time_index)
    gain = 0.7 + 0.6 * torch.rand(size, 1, 1, generator=gen)
    x = gain * x + 0.3 * torch.randn(x.shape, generator=gen)
    return x.unsqueeze(1), labels


def _examples(split: int, samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Examples (N, 1, 1, 64, 101) of the task the checkpoint was trained on, and their labels."""
    templates = _class_templates(12, torch.Generator().manual_seed(0))  # as make_checkpoint draws them
    x, labels = _batch(templates, samples, generator(split, seed))
    return x[:, None].numpy(), labels.numpy()


def train_split(samples: int = 128, seed: int = 0) -> dict[str, np.ndarray]:
    """Calibration inputs from the training distribution."""
    return {"mel": _examples(TRAIN, samples, seed)[0]}


def test_split(samples: int = 256) -> dict:
    """Held-out inputs and labels: verification data, never drawn for calibration."""
    mel, labels = _examples(TEST, samples, 0)
    return {"inputs": {"mel": mel}, "labels": labels}


def make_checkpoint(path: str | pathlib.Path) -> None:
    """Train briefly on the synthetic blob task and write ``{"model_state_dict", "config"}`` atomically."""
    torch.manual_seed(0)
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    config = {"num_classes": 12, "channels": 16, "n_blocks": 3}
    model = build(config)
    templates = _class_templates(config["num_classes"], gen)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(100):
        x, y = _batch(templates, 32, gen)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_atomic({"model_state_dict": state, "config": config}, pathlib.Path(path))


if __name__ == "__main__":
    main(make_checkpoint, __doc__)
