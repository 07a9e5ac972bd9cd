"""A small causal language model with a KV cache, trained deterministically on a project-made
task in under a minute on 2 CPU cores: the zoo's generator.

The language: a sequence opens with a rule token r (one of len(STRIDES)) and a start value x0;
each next token is x_{t+1} = (x_t + STRIDES[r]) mod VALUES. The model must read the rule from
the first token and keep applying it: greedy generation from a prompt [r, x0, x1] is exact for
a trained model, so a quantized artifact that changes a token is wrong, not unlucky.

Token ids: values 0..VALUES-1, rules VALUES..VOCAB-1.

forward(token (1, T) int64, position (T,) int64) -> logits (1, VOCAB): one call of T tokens
(a whole prompt: prefill; then one token a call: decode). The keys and values of each layer sit
in buffers `k_cache` / `v_cache` (1, heads, MAX_LEN, head width), written at the positions in
place and read up to each one (a static cache, a cache-position input): an .onnx takes and
returns them as state, a .pte keeps them as mutable buffers.
sequence(tokens (B, T)) -> logits (B, T, VOCAB): the same weights over whole sequences with a
causal mask, for training. `python -m models.generator checkpoints/generator.pt` trains it.
"""
from __future__ import annotations

import math
import pathlib

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from models.checkpoint_io import fit, intra_op_threads, main, save_atomic

VALUES = 24
STRIDES = (1, 2, 3, 5)
VOCAB = VALUES + len(STRIDES)
MAX_LEN = 32
TRAIN_LENGTH = 28


class Block(nn.Module):
    """Pre-norm attention and MLP, with its own KV cache for decoding."""

    def __init__(self, width: int, heads: int, max_len: int):
        super().__init__()
        self.heads, self.head_width = heads, width // heads
        self.norm1, self.qkv, self.out = nn.LayerNorm(width), nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.norm2, self.up, self.down = nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.register_buffer("k_cache", torch.zeros(1, heads, max_len, self.head_width))
        self.register_buffer("v_cache", torch.zeros(1, heads, max_len, self.head_width))

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, length, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        return tuple(t.reshape(batch, length, self.heads, self.head_width).transpose(1, 2) for t in (q, k, v))

    def _attend(self, x, q, k, v, visible: torch.Tensor) -> torch.Tensor:
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_width)
        weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        mixed = (weights @ v).transpose(1, 2).reshape(x.shape)
        h = x + self.out(mixed)
        return h + self.down(F.gelu(self.up(self.norm2(h))))

    def sequence(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(x)
        length = x.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        return self._attend(x, q, k, v, causal)

    def step(self, x: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """x (1, T, width) at `position` (T,): each token's keys and values written at its
        position, each seeing the cache up to its own (T > 1: a prompt prefilled in one call)."""
        q, k, v = self._split(x)
        self.k_cache[:, :, position] = k
        self.v_cache[:, :, position] = v
        visible = torch.arange(self.k_cache.shape[2])[None] <= position[:, None]
        return self._attend(x, q, self.k_cache, self.v_cache, visible)


class Generator(nn.Module):
    def __init__(self, vocab: int = VOCAB, width: int = 64, heads: int = 4, layers: int = 2,
                 max_len: int = MAX_LEN):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, width), nn.Embedding(max_len, width)
        self.blocks = nn.ModuleList(Block(width, heads, max_len) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, vocab)

    def forward(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """token (1, T) at position (T,) -> the logits (1, VOCAB) of the token after the last."""
        x = self.tokens(token) + self.positions(position)[None]
        for block in self.blocks:
            x = block.step(x, position)
        return self.head(self.norm(x[:, -1]))

    def sequence(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tokens(tokens) + self.positions(torch.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block.sequence(x)
        return self.head(self.norm(x))


def build(config: dict) -> nn.Module:
    return Generator(**config)


def sequences(count: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """`count` sequences of the language: [rule, x0, x1, ...], (count, length) int64."""
    rules = torch.randint(len(STRIDES), (count,), generator=generator)
    starts = torch.randint(VALUES, (count,), generator=generator)
    strides = torch.tensor(STRIDES)[rules]
    values = (starts[:, None] + strides[:, None] * torch.arange(length - 1)) % VALUES
    return torch.cat([(rules + VALUES)[:, None], values], dim=1)


def prompts(count: int = 4, length: int = 3, seed: int = 1) -> list[list[int]]:
    """Held-out prompts [rule, x0, x1] (a seed training never uses)."""
    return sequences(count, length, torch.Generator().manual_seed(1000 + seed)).tolist()


def calibration_steps(samples: int = 128, seed: int = 0) -> dict[str, np.ndarray]:
    """Decode-step inputs of whole sequences in order (token, position), as a stream calls it."""
    count = -(-samples // TRAIN_LENGTH)
    tokens = sequences(count, TRAIN_LENGTH, torch.Generator().manual_seed(2000 + seed)).reshape(-1)[:samples]
    positions = torch.arange(TRAIN_LENGTH).repeat(count)[:samples]
    return {"token": tokens.reshape(samples, 1, 1).numpy(), "position": positions.reshape(samples, 1).numpy()}


def make_random_checkpoint(path: str | pathlib.Path, width: int = 64, layers: int = 2) -> None:
    """Seeded untrained weights at any size (one head per 64 of width), the checkpoint format
    make_checkpoint writes: for `make scale --family generator`, where the sizes matter."""
    torch.manual_seed(0)
    config = {"vocab": VOCAB, "width": width, "heads": max(1, width // 64), "layers": layers, "max_len": MAX_LEN}
    save_atomic({"model_state_dict": build(config).state_dict(), "config": config}, pathlib.Path(path))


def make_checkpoint(path: str | pathlib.Path) -> None:
    """Train on the language (next-token cross-entropy after the start value); write
    {"model_state_dict", "config"} with empty caches."""
    torch.manual_seed(0)
    config = {"vocab": VOCAB, "width": 64, "heads": 4, "layers": 2, "max_len": MAX_LEN}
    model = build(config)
    data = torch.Generator().manual_seed(0)

    def loss_at(step: int) -> torch.Tensor:
        batch = sequences(64, TRAIN_LENGTH, data)
        logits = model.sequence(batch[:, :-1])
        return F.cross_entropy(logits[:, 1:].reshape(-1, VOCAB), batch[:, 2:].reshape(-1))  # x1 on

    with intra_op_threads(2):
        state = fit(model, torch.optim.AdamW(model.parameters(), weight_decay=0.01), 300, 5e-3, loss_at)
    save_atomic({"model_state_dict": state, "config": config}, pathlib.Path(path))


if __name__ == "__main__":
    main(make_checkpoint, __doc__)
