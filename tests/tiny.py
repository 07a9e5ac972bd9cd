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


class BranchingNet(TinyNet):
    """Branches on a tensor's value: torch.export cannot capture it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        if y.sum() > 0:
            return y
        return -y


@torch.library.custom_op("tiny::wobble", mutates_args=())
def wobble(x: torch.Tensor) -> torch.Tensor:
    """A custom operator: torch.export captures it (it has a fake kernel), no exporter knows it."""
    return x * 2


@wobble.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class Wobble(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return wobble(x)


class CustomOpNet(TinyNet):
    """TinyNet's weights, with the custom operator in a sub-module `act`."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.act = Wobble()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x))
