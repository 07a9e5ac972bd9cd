"""A tiny model for fast tests: one hidden layer on (B, 16) features."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, features: int = 16, hidden: int = 32, classes: int = 4):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def write_checkpoint(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    torch.save({"model_state_dict": TinyNet().state_dict(), "config": {"features": 16}}, path)
    return path


def calibration(samples: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((samples, 1, 16)).astype(np.float32)}
