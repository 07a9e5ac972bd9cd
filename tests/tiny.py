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


class NormNet(nn.Module):
    """Linear -> LayerNorm -> GELU -> Linear blocks on (B, width): what transformers stack."""

    def __init__(self, width: int = 256, blocks: int = 2, classes: int = 4):
        super().__init__()
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width), nn.GELU())
                                      for _ in range(blocks)])
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


def write_norm_checkpoint(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    torch.save(NormNet().state_dict(), path)
    return path


class OutlierNet(nn.Module):
    """A head whose weights hold one huge column (its input feature is always 0): per-channel
    int8 scales are set by that column and every other weight rounds to zero."""

    def __init__(self, features: int = 16, hidden: int = 64, classes: int = 4):
        super().__init__()
        self.fc = nn.Linear(features, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(x)))


def write_outlier_checkpoint(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = OutlierNet()
    with torch.no_grad():
        model.fc.weight[0], model.fc.bias[0] = 0.0, -1.0  # feature 0 is relu(-1) = 0
        model.head.weight *= 4  # logits apart enough that float rounding never flips the top class
        model.head.weight[:, 0] = 1000.0
    torch.save(model.state_dict(), path)
    return path


class TokenNet(nn.Module):
    """Token ids (int64) through an embedding: ids past the vocabulary fail."""

    def __init__(self, vocab: int = 10, width: int = 8, classes: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids).mean(1))


def calibration_without_seed(samples: int = 8) -> dict[str, np.ndarray]:
    """A calibration callable that forgot the seed argument the pipeline passes."""
    return calibration(samples)


class ConvBlock(nn.Module):
    """Conv then ReLU6 inside one module (MobileNetV2's ConvLayer): onnxruntime's quantizer folds
    the ReLU6 into the QuantizeLinear after the conv."""

    def __init__(self, channels: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3, padding=1)
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class BlockNet(nn.Module):
    def __init__(self, channels: int = 8, classes: int = 4):
        super().__init__()
        self.stem = ConvBlock(channels)
        self.head = nn.Linear(channels * 8 * 8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stem(x).flatten(1))


class WordNet(nn.Module):
    """Token ids through an embedding table and two Linear layers: what int4 quantizes."""

    def __init__(self, vocab: int = 64, width: int = 32, hidden: int = 64, classes: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.body = nn.Sequential(nn.Linear(width, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, classes)
        with torch.no_grad():
            self.head.weight *= 8  # logits apart enough that 4-bit rounding rarely flips the top class

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(ids)).mean(1))


def write_word_checkpoint(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    torch.save(WordNet().state_dict(), path)
    return path


class Floor(nn.Module):
    """Masks negative features with -1e9: a constant half precision cannot hold."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x > 0, x, -1e9)


class MaskedNet(TinyNet):
    def __init__(self, **sizes):
        super().__init__(**sizes)
        self.floor = Floor()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.floor(x).clamp(min=-4.0))


class Recurrence(nn.Module):
    """The state a decoder carries between calls (a KV cache's stand-in), updated in place."""

    def __init__(self, width: int):
        super().__init__()
        self.register_buffer("h", torch.zeros(1, width))
        self.mix = nn.Linear(2 * width, width)

    def forward(self, embedded: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(torch.cat([embedded, self.h], dim=-1)))
        self.h.copy_(h)
        return h


class TinyDecoder(nn.Module):
    """One token id a call -> logits over the vocabulary; greedy decoding feeds the argmax back."""

    def __init__(self, vocab: int = 32, width: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.step = Recurrence(width)
        self.head = nn.Linear(width, vocab)
        with torch.no_grad():
            self.head.weight *= 6  # logits well apart: float rounding never picks another token

    def forward(self, token: torch.Tensor) -> torch.Tensor:
        return self.head(self.step(self.embed(token)[:, 0]))


def write_decoder_checkpoint(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    torch.save(TinyDecoder().state_dict(), path)
    return path
