"""Streaming pitch estimator built from cached 1-D convolutions (in the style of PESTO's ``cached_conv.py``).

``StreamingPitch.forward`` takes one hop of 16 kHz audio ``(1, 1, hop)`` and returns
``(pitch_logits (1, n_bins), confidence (1, 1))``. Each ``CachedConv1d`` keeps the tail of its past input in a
persistent buffer ``cache`` that is updated in place, so consecutive calls equal ``forward_sequence`` on the
concatenated signal (which left-pads with zeros instead of reading the caches).
Bin ``i`` is centred on ``fmin * (fmax / fmin) ** (i / (n_bins - 1))`` Hz (see ``bin_frequencies``).
"""
from __future__ import annotations

import math
import pathlib

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from models.checkpoint_io import main, save_atomic

TOTAL_STRIDE = 80


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
        """Streaming step: convolve ``[cache, x]`` and keep its last ``pad`` frames as the new cache.

        The cache is written detached: it never carries autograd history from one call into the next, and
        ExecuTorch's ``to_executorch`` rejects the in-place write of a grad-requiring value into the buffer.
        """
        xc = torch.cat([self.cache, x], dim=-1)
        self.cache.copy_(xc[..., -self.pad:].detach())
        return self.conv(xc)

    def forward_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """Whole-signal equivalent from an empty cache: zero left padding; the cache is not touched."""
        return self.conv(F.pad(x, (self.pad, 0)))

    def reset_state(self) -> None:
        """Zero the cache (start of a new stream)."""
        self.cache.zero_()


class StreamingPitch(nn.Module):
    """Cached conv stack (conv -> BatchNorm -> ReLU) reducing each hop to one frame, then pitch and confidence heads.

    Use it in ``eval()`` mode for streaming: BatchNorm then is a fixed per-channel affine map.
    """

    def __init__(self, *, hop: int = 160, n_bins: int = 24, channels: int = 32, sample_rate: int = 16000,
                 fmin: float = 80.0, fmax: float = 800.0) -> None:
        super().__init__()
        if hop % TOTAL_STRIDE:
            raise ValueError(f"hop must be a multiple of {TOTAL_STRIDE} (the total stride), got {hop}")
        self.hop = hop
        self.n_bins = n_bins
        self.sample_rate = sample_rate
        self.fmin = fmin
        self.fmax = fmax
        spec = [  # (in, out, kernel, stride, dilation); the strides multiply to TOTAL_STRIDE
            (1, channels, 64, 4, 1),
            (channels, channels, 5, 4, 1),
            (channels, channels, 3, 1, 2),
            (channels, channels, 3, 5, 4),
            (channels, channels, 3, 1, 2),
        ]
        self.convs = nn.ModuleList(
            CachedConv1d(in_channels=i, out_channels=o, kernel_size=k, stride=s, dilation=d) for i, o, k, s, d in spec
        )
        self.norms = nn.ModuleList(nn.BatchNorm1d(o) for _, o, _, _, _ in spec)
        self.pitch_head = nn.Linear(channels, n_bins)
        self.confidence_head = nn.Linear(channels, 1)

    def _heads(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(..., channels)`` features -> ``(pitch_logits (..., n_bins), confidence (..., 1))``."""
        return self.pitch_head(h), torch.sigmoid(self.confidence_head(h))

    def forward(self, chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One hop ``(1, 1, hop)`` -> ``(pitch_logits (1, n_bins), confidence (1, 1))``; updates the caches."""
        h = chunk
        for conv, norm in zip(self.convs, self.norms):
            h = F.relu(norm(conv(h)))
        return self._heads(h.mean(dim=-1))

    def forward_sequence(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Non-streaming equivalent: ``(B, 1, n_hops * hop)`` -> ``(B, n_hops, n_bins)``, ``(B, n_hops, 1)``."""
        h = audio
        for conv, norm in zip(self.convs, self.norms):
            h = F.relu(norm(conv.forward_sequence(h)))
        h = h.unflatten(-1, (-1, self.hop // TOTAL_STRIDE)).mean(dim=-1).transpose(1, 2)
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
    """Piecewise sines (a random log-uniform frequency per segment of 4 to 8 hops, ~20 % silent) plus noise.

    Returns audio ``(size, 1, n_hops * hop)``, bin targets ``(size, n_hops)`` and voiced flags ``(size, n_hops)``.
    """
    hop, sr = model.hop, model.sample_rate
    log_lo, log_hi = math.log(model.fmin), math.log(model.fmax)
    n_segments = n_hops // 4 + 1
    durations = torch.randint(4, 9, (size, n_segments), generator=gen)
    starts = torch.cumsum(durations, dim=1) - durations
    segment = (torch.arange(n_hops)[None, :, None] >= starts[:, None, :]).sum(-1) - 1
    seg_freq = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(size, n_segments, generator=gen))
    seg_voiced = (torch.rand(size, n_segments, generator=gen) > 0.2).float()
    freqs, voiced = seg_freq.gather(1, segment), seg_voiced.gather(1, segment)
    phase = torch.cumsum(2 * math.pi * freqs.repeat_interleave(hop, dim=1) / sr, dim=1)
    phase = phase + 2 * math.pi * torch.rand(size, 1, generator=gen)
    amp = (0.2 + 0.8 * torch.rand(size, 1, generator=gen)) * voiced.repeat_interleave(hop, dim=1)
    audio = amp * torch.sin(phase) + 0.02 * torch.randn(size, n_hops * hop, generator=gen)
    bins = torch.round((torch.log(freqs) - log_lo) / (log_hi - log_lo) * (model.n_bins - 1)).long()
    return audio.unsqueeze(1), bins, voiced


def calibration_chunks(samples: int = 128, seed: int = 0) -> dict[str, np.ndarray]:
    """``samples`` consecutive hops ``(samples, 1, 1, hop)`` of one piecewise-sine stream, in order."""
    audio, _, _ = _batch(StreamingPitch(), 1, samples, torch.Generator().manual_seed(seed))
    return {"chunk": audio.reshape(samples, 1, 1, -1).numpy()}


def make_checkpoint(path: str | pathlib.Path) -> None:
    """Train on piecewise sines (non-streaming path); write ``{"model_state_dict", "config"}`` with zeroed caches."""
    torch.manual_seed(0)
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    config = {"hop": 160, "n_bins": 24, "channels": 32, "sample_rate": 16000, "fmin": 80.0, "fmax": 800.0}
    model = build(config)
    steps = 300
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    model.train()
    for _ in range(steps):
        audio, bins, voiced = _batch(model, 16, 24, gen)
        logits, confidence = model.forward_sequence(audio)
        pitch_loss = (F.cross_entropy(logits.transpose(1, 2), bins, reduction="none") * voiced).sum()
        loss = pitch_loss / voiced.sum().clamp(min=1.0) + F.binary_cross_entropy(confidence.squeeze(-1), voiced)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    model.reset_state()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_atomic({"model_state_dict": state, "config": config}, pathlib.Path(path))


if __name__ == "__main__":
    main(make_checkpoint, __doc__)
