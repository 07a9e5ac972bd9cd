"""A tiny streaming model for fast tests: a linear head on (input, last input, running sum),
the last two kept in buffers that forward updates in place."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

FEATURES = 8


class Memory(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.register_buffer("previous", torch.zeros(1, features))
        self.register_buffer("total", torch.zeros(1, features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seen = torch.cat([x, self.previous, self.total], dim=-1)
        self.previous.copy_(x)
        self.total.add_(x)
        return seen


class TinyStream(nn.Module):
    def __init__(self, features: int = FEATURES, classes: int = 4):
        super().__init__()
        self.memory = Memory(features)
        self.head = nn.Linear(3 * features, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.memory(x))


def write_checkpoint(path: Path) -> Path:
    """Seeded weights; `memory.previous` starts at 0.25, so one state has a non-zero initial value."""
    torch.manual_seed(0)
    model = TinyStream()
    model.memory.previous.fill_(0.25)
    torch.save({"model_state_dict": model.state_dict(), "config": {}}, path)
    return path


class RebindingStream(TinyStream):
    """The same model with its state updated by assignment, which torch.export does not record."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        memory = self.memory
        seen = torch.cat([x, memory.previous, memory.total], dim=-1)
        memory.previous = x
        memory.total = memory.total + x
        return self.head(seen)
