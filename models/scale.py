"""A user's model at any size, for `make scale`: residual blocks of LayerNorm -> Linear -> GELU ->
Linear over (B, 64, width) tokens, mean-pooled to 16 scores. Random seeded weights (the sizes
matter, not the task): width 128 x 8 blocks is 1M parameters, 256 x 20 10M, 512 x 48 100M and
2048 x 30 1B (hidden = 4 x width)."""
from __future__ import annotations

import pathlib

import torch
from torch import nn

from .checkpoint_io import main, save_atomic


class Block(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.down = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(self.act(self.up(self.norm(x))))


class ResidualMLP(nn.Module):
    def __init__(self, width: int = 512, hidden: int = 2048, blocks: int = 48, classes: int = 16):
        super().__init__()
        self.blocks = nn.Sequential(*[Block(width, hidden) for _ in range(blocks)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(tokens)).mean(dim=1))


def make_checkpoint(path: str | pathlib.Path, width: int = 512, hidden: int = 2048, blocks: int = 48) -> None:
    """Seeded weights of the given size, as a plain state dict (written without a second copy:
    the model is built on the meta device and each block materialized on its own)."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = ResidualMLP(width, hidden, blocks)
    state = {}
    for name, module in model.named_modules():
        direct = dict(module.named_parameters(recurse=False))
        if not direct:
            continue
        real = module.to_empty(device="cpu", recurse=False)
        if hasattr(real, "reset_parameters"):
            real.reset_parameters()
        for key, value in direct.items():
            state[f"{name}.{key}" if name else key] = getattr(real, key).detach()
    save_atomic(state, pathlib.Path(path))


if __name__ == "__main__":
    main(make_checkpoint, __doc__)
