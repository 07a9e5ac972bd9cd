"""Streaming pitch estimator built from cached 1-D convolutions (in the style of PESTO's ``cached_conv.py``).

``StreamingPitch.forward`` takes one hop of 16 kHz audio ``(1, 1, hop)`` and returns
``(pitch_logits (1, n_bins), confidence (1, 1))``. Each ``CachedConv1d`` keeps the tail of its past input in a
persistent buffer ``cache`` that is updated in place, so consecutive calls equal ``forward_sequence`` on the
concatenated signal (which left-pads with zeros instead of reading the caches).
Bin ``i`` is centred on ``fmin * (fmax / fmin) ** (i / (n_bins - 1))`` Hz (see ``bin_frequencies``).
"""
from __future__ import annotations

import argparse
import math
import os
import pathlib
import tempfile

import torch
from torch import nn
from torch.nn import functional as F


class CachedConv1d(nn.Module):
    """Causal Conv1d whose left context comes from a buffer ``cache (1, in_channels, (kernel_size - 1) * dilation)``.

    Streaming chunks must have a length divisible by ``stride`` (``forward_sequence`` has no such limit).
    """

    def __init__(self, *, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 dilation: int = 1) -> None:
        super().__init__()
        self.pad = (kernel_size - 1) * dilation
        if self.pad == 0:
            raise ValueError("CachedConv1d needs kernel_size > 1: there is nothing to cache otherwise")
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride, dilation=dilation)
        self.register_buffer("cache", torch.zeros(1, in_channels, self.pad))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Streaming step: convolve ``[cache, x]`` and keep its last ``pad`` frames as the new cache."""
        xc = torch.cat([self.cache, x], dim=-1)
        self.cache.copy_(xc[..., -self.pad:])
        return self.conv(xc)

    def forward_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """Whole-signal equivalent from an empty cache: zero left padding; the cache is not touched."""
        return self.conv(F.pad(x, (self.pad, 0)))

    def reset_state(self) -> None:
        """Zero the cache (start of a new stream)."""
        self.cache.zero_()


class StreamingPitch(nn.Module):
    """Cached conv stack that reduces each hop to one frame, then pitch-bin and confidence heads."""

    def __init__(self, *, hop: int = 160, n_bins: int = 48, channels: int = 32, sample_rate: int = 16000,
                 fmin: float = 80.0, fmax: float = 800.0) -> None:
        super().__init__()
        if hop % 80:
            raise ValueError(f"hop must be a multiple of 80 (the total stride), got {hop}")
        self.hop = hop
        self.n_bins = n_bins
        self.sample_rate = sample_rate
        self.fmin = fmin
        self.fmax = fmax
        spec = [  # (in, out, kernel, stride, dilation); strides multiply to 80
            (1, channels, 64, 4, 1),
            (channels, channels, 5, 4, 1),
            (channels, channels, 3, 1, 2),
            (channels, channels, 3, 5, 4),
            (channels, channels, 3, 1, 2),
        ]
        self.convs = nn.ModuleList(
            CachedConv1d(in_channels=i, out_channels=o, kernel_size=k, stride=s, dilation=d) for i, o, k, s, d in spec
        )
        self.pitch_head = nn.Linear(channels, n_bins)
        self.confidence_head = nn.Linear(channels, 1)

    def _heads(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(..., channels)`` features -> ``(pitch_logits (..., n_bins), confidence (..., 1))``."""
        return self.pitch_head(h), torch.sigmoid(self.confidence_head(h))

    def forward(self, chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One hop ``(1, 1, hop)`` -> ``(pitch_logits (1, n_bins), confidence (1, 1))``; updates the caches."""
        h = chunk
        for conv in self.convs:
            h = F.relu(conv(h))
        return self._heads(h.mean(dim=-1))

    def forward_sequence(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Non-streaming equivalent: ``(B, 1, n_hops * hop)`` -> ``(B, n_hops, n_bins)``, ``(B, n_hops, 1)``."""
        h = audio
        for conv in self.convs:
            h = F.relu(conv.forward_sequence(h))
        frames_per_hop = self.hop // 80
        h = h.unflatten(-1, (-1, frames_per_hop)).mean(dim=-1).transpose(1, 2)
        return self._heads(h)

    def reset_state(self) -> None:
        """Zero every cache (start of a new stream)."""
        for conv in self.convs:
            conv.reset_state()

    def bin_frequencies(self) -> torch.Tensor:
        """Centre frequency in Hz of each pitch bin, log-spaced from ``fmin`` to ``fmax``."""
        return self.fmin * (self.fmax / self.fmin) ** torch.linspace(0.0, 1.0, self.n_bins)


def build(config: dict) -> nn.Module:
    """Rebuild the model from the ``config`` dict stored in the checkpoint."""
    return StreamingPitch(**config)


def _batch(model: StreamingPitch, size: int, n_hops: int, gen: torch.Generator
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Piecewise sines (one random frequency per segment) with silent segments, plus noise.

    Returns audio ``(size, 1, n_hops * hop)``, bin targets ``(size, n_hops)`` and voiced flags ``(size, n_hops)``.
    Each hop's frequency is held for 4 to 12 hops; about a fifth of the segments are silent.
    """
    hop, sr = model.hop, model.sample_rate
    log_lo, log_hi = math.log(model.fmin), math.log(model.fmax)
    freqs = torch.zeros(size, n_hops)
    voiced = torch.zeros(size, n_hops)
    for b in range(size):
        t = 0
        while t < n_hops:
            dur = int(torch.randint(4, 13, (1,), generator=gen))
            freqs[b, t:t + dur] = math.exp(log_lo + (log_hi - log_lo) * float(torch.rand(1, generator=gen)))
            voiced[b, t:t + dur] = float(torch.rand(1, generator=gen) > 0.2)
            t += dur
    per_sample = freqs.repeat_interleave(hop, dim=1)
    phase = torch.cumsum(2 * math.pi * per_sample / sr, dim=1) + 2 * math.pi * torch.rand(size, 1, generator=gen)
    amp = (0.2 + 0.8 * torch.rand(size, 1, generator=gen)) * voiced.repeat_interleave(hop, dim=1)
    audio = amp * torch.sin(phase) + 0.02 * torch.randn(size, n_hops * hop, generator=gen)
    position = (torch.log(freqs.clamp(min=model.fmin)) - log_lo) / (log_hi - log_lo)
    bins = torch.round(position * (model.n_bins - 1)).long()
    return audio.unsqueeze(1), bins, voiced


def make_checkpoint(path: str | pathlib.Path) -> None:
    """Train on piecewise sines (non-streaming path); write ``{"model_state_dict", "config"}`` with zeroed caches."""
    torch.manual_seed(0)
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    config = {"hop": 160, "n_bins": 48, "channels": 32, "sample_rate": 16000, "fmin": 80.0, "fmax": 800.0}
    model = build(config)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        audio, bins, voiced = _batch(model, 16, 24, gen)
        logits, confidence = model.forward_sequence(audio)
        pitch_loss = (F.cross_entropy(logits.transpose(1, 2), bins, reduction="none") * voiced).sum()
        loss = pitch_loss / voiced.sum().clamp(min=1.0) + F.binary_cross_entropy(confidence.squeeze(-1), voiced)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.reset_state()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    _save_atomic({"model_state_dict": state, "config": config}, pathlib.Path(path))


def _save_atomic(obj: dict, path: pathlib.Path) -> None:
    """``torch.save`` to a temp file in the target directory, then ``os.replace`` it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_path", type=pathlib.Path, help="where to write the checkpoint")
    make_checkpoint(parser.parse_args().out_path)
