"""Small NeMo-style Conformer RNN-T: conformer encoder, LSTM prediction network, joint network.

Token ids are ``0 .. vocab_size - 1``; the blank id is ``vocab_size`` (the last joint output), and
blank also serves as the start-of-sequence input of the prediction network (its embedding row is the
``padding_idx``, i.e. all zeros), as in NeMo with ``blank_as_pad``.
"""
from __future__ import annotations

import math
import pathlib

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from models.checkpoint_io import main, save_atomic
from models.splits import TEST, TRAIN, generator

COMPILED_PREFIX = "encoder._orig_mod."
CONFIG = {  # what make_checkpoint trains (and stores in the checkpoint)
    "feat_in": 80, "d_model": 64, "n_layers": 2, "n_heads": 4, "ff_expansion": 4, "conv_kernel_size": 15,
    "subsampling_factor": 2, "vocab_size": 16, "pred_hidden": 64, "pred_layers": 1, "joint_dim": 64,
    "dropout": 0.0,
}


class ConvSubsampling(nn.Module):
    """Strided Conv1d over time (``T' = ceil(T / factor)``), ReLU, linear projection to ``d_model``."""

    def __init__(self, *, feat_in: int, d_model: int, factor: int) -> None:
        super().__init__()
        self.factor = factor
        self.conv = nn.Conv1d(feat_in, d_model, 2 * factor - 1, stride=factor, padding=factor - 1)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, length: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.out(F.relu(self.conv(x)).transpose(1, 2))
        return x, torch.div(length + self.factor - 1, self.factor, rounding_mode="floor")


class FeedForward(nn.Sequential):
    """Linear -> SiLU -> Dropout -> Linear."""

    def __init__(self, *, d_model: int, expansion: int, dropout: float) -> None:
        super().__init__(
            nn.Linear(d_model, d_model * expansion),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Linear(d_model * expansion, d_model),
        )


class MultiHeadAttention(nn.Module):
    """Scaled dot-product self-attention; padded key frames are masked out."""

    def __init__(self, *, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.linear_q = nn.Linear(d_model, d_model)
        self.linear_k = nn.Linear(d_model, d_model)
        self.linear_v = nn.Linear(d_model, d_model)
        self.linear_out = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        batch, frames, d_model = x.shape
        d_head = d_model // self.n_heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, frames, self.n_heads, d_head).transpose(1, 2)

        q, k, v = heads(self.linear_q(x)), heads(self.linear_k(x)), heads(self.linear_v(x))
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(d_head)
        scores = scores.masked_fill(pad_mask[:, None, None, :], -10000.0)
        attn = self.dropout(torch.softmax(scores, dim=-1))
        out = torch.matmul(attn, v).transpose(1, 2).reshape(batch, frames, d_model)
        return self.linear_out(out)


class ConvModule(nn.Module):
    """Pointwise conv + GLU, depthwise conv (padded frames zeroed first), BatchNorm, SiLU, pointwise conv."""

    def __init__(self, *, d_model: int, kernel_size: int) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"conv_kernel_size must be odd, got {kernel_size}")
        self.pointwise_conv1 = nn.Conv1d(d_model, 2 * d_model, 1)
        self.depthwise_conv = nn.Conv1d(d_model, d_model, kernel_size, padding=kernel_size // 2, groups=d_model)
        self.batch_norm = nn.BatchNorm1d(d_model)
        self.pointwise_conv2 = nn.Conv1d(d_model, d_model, 1)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        x = F.glu(self.pointwise_conv1(x.transpose(1, 2)), dim=1)
        x = x.masked_fill(pad_mask[:, None, :], 0.0)
        x = F.silu(self.batch_norm(self.depthwise_conv(x)))
        return self.pointwise_conv2(x).transpose(1, 2).contiguous()


class ConformerLayer(nn.Module):
    """Macaron block: half-step FFN, MHSA, conv module, half-step FFN, each pre-norm + residual; final LayerNorm."""

    def __init__(self, *, d_model: int, n_heads: int, ff_expansion: int, conv_kernel_size: int, dropout: float) -> None:
        super().__init__()
        self.norm_feed_forward1 = nn.LayerNorm(d_model)
        self.feed_forward1 = FeedForward(d_model=d_model, expansion=ff_expansion, dropout=dropout)
        self.norm_self_att = nn.LayerNorm(d_model)
        self.self_attn = MultiHeadAttention(d_model=d_model, n_heads=n_heads, dropout=dropout)
        self.norm_conv = nn.LayerNorm(d_model)
        self.conv = ConvModule(d_model=d_model, kernel_size=conv_kernel_size)
        self.norm_feed_forward2 = nn.LayerNorm(d_model)
        self.feed_forward2 = FeedForward(d_model=d_model, expansion=ff_expansion, dropout=dropout)
        self.norm_out = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        x = x + 0.5 * self.dropout(self.feed_forward1(self.norm_feed_forward1(x)))
        x = x + self.dropout(self.self_attn(self.norm_self_att(x), pad_mask))
        x = x + self.dropout(self.conv(self.norm_conv(x), pad_mask))
        x = x + 0.5 * self.dropout(self.feed_forward2(self.norm_feed_forward2(x)))
        return self.norm_out(x)


def sinusoidal_positions(length: int, d_model: int, like: torch.Tensor) -> torch.Tensor:
    """``(length, d_model)`` absolute sinusoidal position encoding (sin/cos interleaved)."""
    pos = torch.arange(length, dtype=like.dtype, device=like.device).unsqueeze(1)
    inv_freq = torch.exp(
        torch.arange(0, d_model, 2, dtype=like.dtype, device=like.device) * (-math.log(10000.0) / d_model)
    )
    angles = pos * inv_freq
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)


class ConformerEncoder(nn.Module):
    """Conv subsampling, sinusoidal positions, conformer layers.

    ``forward(audio_signal (B, feat_in, T) float, length (B,) int64)`` returns
    ``(encoded (B, d_model, T') float, encoded_len (B,) int64)`` with ``T' = ceil(T / subsampling_factor)``.
    Exports with a dynamic batch and ``torch.export.Dim("T", min=3)`` (min 3 keeps ``T' >= 2``: size 1 would
    be specialised).
    """

    def __init__(
        self,
        *,
        feat_in: int = 80,
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        ff_expansion: int = 4,
        conv_kernel_size: int = 15,
        subsampling_factor: int = 2,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if d_model % 2:
            raise ValueError(f"d_model must be even, got {d_model}")
        self.d_model = d_model
        self.pre_encode = ConvSubsampling(feat_in=feat_in, d_model=d_model, factor=subsampling_factor)
        self.layers = nn.ModuleList(
            ConformerLayer(
                d_model=d_model, n_heads=n_heads, ff_expansion=ff_expansion,
                conv_kernel_size=conv_kernel_size, dropout=dropout,
            )
            for _ in range(n_layers)
        )

    def forward(self, audio_signal: torch.Tensor, length: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, length = self.pre_encode(audio_signal, length)
        frames = x.shape[1]
        x = x + sinusoidal_positions(frames, self.d_model, x)
        pad_mask = torch.arange(frames, device=x.device).unsqueeze(0) >= length.unsqueeze(1)
        for layer in self.layers:
            x = layer(x, pad_mask)
        return x.transpose(1, 2), length


class RNNTDecoder(nn.Module):
    """Prediction network: ``nn.Embedding`` (blank id ``vocab_size`` = padding row) and a time-major ``nn.LSTM``."""

    def __init__(self, *, vocab_size: int, pred_hidden: int, pred_layers: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.blank_id = vocab_size
        self.embedding = nn.Embedding(vocab_size + 1, pred_hidden, padding_idx=vocab_size)
        self.lstm = nn.LSTM(pred_hidden, pred_hidden, num_layers=pred_layers,
                            dropout=dropout if pred_layers > 1 else 0.0)

    def forward(self, targets: torch.Tensor) -> torch.Tensor:
        """``targets (B, U)`` int64 -> prediction outputs ``(B, pred_hidden, U + 1)`` (blank/SOS prepended)."""
        y = F.pad(targets, (1, 0), value=self.blank_id)
        out, _ = self.lstm(self.embedding(y).transpose(0, 1))
        return out.permute(1, 2, 0)


class RNNTJoint(nn.Module):
    """``forward(encoder_outputs (B, D, T), decoder_outputs (B, H, U)) -> logits (B, T, U, vocab_size + 1)``."""

    def __init__(self, *, enc_dim: int, pred_dim: int, joint_dim: int, vocab_size: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.enc = nn.Linear(enc_dim, joint_dim)
        self.pred = nn.Linear(pred_dim, joint_dim)
        self.joint_net = nn.Sequential(nn.ReLU(), nn.Dropout(dropout), nn.Linear(joint_dim, vocab_size + 1))

    def forward(self, encoder_outputs: torch.Tensor, decoder_outputs: torch.Tensor) -> torch.Tensor:
        f = self.enc(encoder_outputs.transpose(1, 2)).unsqueeze(2)
        g = self.pred(decoder_outputs.transpose(1, 2)).unsqueeze(1)
        return self.joint_net(f + g)


class ConformerRNNT(nn.Module):
    """Encoder + prediction network + joint; ``forward`` is the encoder, ``decode_step`` one greedy step."""

    def __init__(
        self,
        *,
        feat_in: int = 80,
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        ff_expansion: int = 4,
        conv_kernel_size: int = 15,
        subsampling_factor: int = 2,
        vocab_size: int = 16,
        pred_hidden: int = 64,
        pred_layers: int = 1,
        joint_dim: int = 64,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.encoder = ConformerEncoder(
            feat_in=feat_in, d_model=d_model, n_layers=n_layers, n_heads=n_heads, ff_expansion=ff_expansion,
            conv_kernel_size=conv_kernel_size, subsampling_factor=subsampling_factor, dropout=dropout,
        )
        self.decoder = RNNTDecoder(vocab_size=vocab_size, pred_hidden=pred_hidden, pred_layers=pred_layers,
                                   dropout=dropout)
        self.joint = RNNTJoint(enc_dim=d_model, pred_dim=pred_hidden, joint_dim=joint_dim, vocab_size=vocab_size,
                               dropout=dropout)

    def forward(self, audio_signal: torch.Tensor, length: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(audio_signal, length)

    def decode_step(
        self, y_prev: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, enc_t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``y_prev (B,)`` int64, ``h0, c0 (L, B, H)``, ``enc_t (B, D)`` -> ``(logits (B, V + 1), h1, c1)``."""
        out, (h1, c1) = self.decoder.lstm(self.decoder.embedding(y_prev).unsqueeze(0), (h0, c0))
        logits = self.joint(encoder_outputs=enc_t.unsqueeze(-1), decoder_outputs=out.squeeze(0).unsqueeze(-1))
        return logits.squeeze(2).squeeze(1), h1, c1


def build(config: dict) -> nn.Module:
    """Rebuild the model from the checkpoint ``config`` (load the state dict after stripping ``_orig_mod.``)."""
    return ConformerRNNT(**config)


def _batch(
    templates: torch.Tensor, factor: int, size: int, gen: torch.Generator
) -> dict[str, torch.Tensor]:
    """Token segments (class template + noise) separated by silence, plus the RNN-T alignment path.

    At the encoder frame where a token starts, the path emits the token (from prediction state ``u``) and then
    blank (from ``u + 1``); every other valid frame emits blank from the current state.
    """
    vocab, feat_in = templates.shape
    max_enc = 32
    enc_len = torch.randint(24, max_enc + 1, (size,), generator=gen)
    feats = 0.3 * torch.randn(size, feat_in, max_enc * factor, generator=gen)
    labels: list[list[int]] = []
    emit = torch.zeros(size, max_enc, dtype=torch.bool)
    for b in range(size):
        t, seq = int(torch.randint(1, 4, (1,), generator=gen)), []
        while t + 2 <= int(enc_len[b]):
            k = int(torch.randint(0, vocab, (1,), generator=gen))
            dur = min(int(torch.randint(2, 5, (1,), generator=gen)), int(enc_len[b]) - t)
            feats[b, :, t * factor:(t + dur) * factor] += templates[k].unsqueeze(1)
            emit[b, t] = True
            seq.append(k)
            t += dur + int(torch.randint(1, 4, (1,), generator=gen))
        labels.append(seq)
        feats[b, :, int(enc_len[b]) * factor:] = 0.0
    max_u = max(len(s) for s in labels)
    targets = torch.tensor([s + [vocab] * (max_u - len(s)) for s in labels], dtype=torch.long)
    state = torch.cumsum(emit.long(), dim=1) - emit.long()
    valid = torch.arange(max_enc).unsqueeze(0) < enc_len.unsqueeze(1)
    token = targets.gather(1, state.clamp(max=max_u - 1))
    return {
        "feats": feats, "length": enc_len * factor, "targets": targets, "state": state,
        "first": torch.where(emit, token, torch.full_like(token, vocab)), "emit": emit, "valid": valid,
    }


def _path_loss(model: ConformerRNNT, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of the joint along the alignment path built by ``_batch``."""
    enc, _ = model(batch["feats"], batch["length"])
    logits = model.joint(enc, model.decoder(batch["targets"])).log_softmax(-1)
    n_out = logits.shape[-1]
    state = batch["state"]

    def nll(u: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        idx = u[:, :, None, None].expand(-1, -1, 1, n_out)
        picked = logits.gather(2, idx).squeeze(2)
        return -picked.gather(2, target.unsqueeze(-1)).squeeze(-1)

    blank = torch.full_like(state, n_out - 1)
    after = (state + 1).clamp(max=logits.shape[2] - 1)  # only used where a token is emitted, so never clamped there
    loss = nll(state, batch["first"]) * batch["valid"] + nll(after, blank) * batch["emit"]
    return loss.sum() / (batch["valid"].sum() + batch["emit"].sum())


def _templates(gen: torch.Generator) -> torch.Tensor:
    """One feature template per token (the first draw of make_checkpoint's generator)."""
    return 1.5 * torch.randn(CONFIG["vocab_size"], CONFIG["feat_in"], generator=gen)


def _utterances(split: int, count: int, seed: int) -> dict[str, torch.Tensor]:
    """Fresh utterances of the task the checkpoint was trained on."""
    templates = _templates(torch.Generator().manual_seed(0))
    return _batch(templates, CONFIG["subsampling_factor"], count, generator(split, seed))


def _encoder_inputs(split: int, samples: int, seed: int) -> dict[str, np.ndarray]:
    batch = _utterances(split, samples, seed)
    return {"feats": batch["feats"][:, None].numpy(), "lengths": batch["length"][:, None].numpy()}


def encoder_train_split(samples: int = 128, seed: int = 0) -> dict[str, np.ndarray]:
    """Calibration features (N, 1, 80, 64) and their valid lengths (N, 1)."""
    return _encoder_inputs(TRAIN, samples, seed)


def encoder_test_split(samples: int = 64) -> dict:
    """Held-out features and lengths (no labels: the encoder's outputs are compared as numbers)."""
    return {"inputs": _encoder_inputs(TEST, samples, 0)}


def _decoder_examples(checkpoint: str | pathlib.Path, split: int, samples: int,
                      seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Greedy-step inputs on the alignment paths of fresh utterances, teacher-forced: the previous
    token, the LSTM state after the tokens so far, one encoder frame; the label is what the path
    emits at that frame (a token or blank)."""
    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = build(payload["config"]).eval()
    model.load_state_dict({k.replace(COMPILED_PREFIX, "encoder."): v for k, v in payload["model_state_dict"].items()})
    batch = _utterances(split, -(-samples // 24), seed)  # >= 24 valid frames each
    with torch.no_grad():
        enc, _ = model(batch["feats"], batch["length"])
        y = F.pad(batch["targets"], (1, 0), value=model.decoder.blank_id)
        layers, hidden = model.decoder.lstm.num_layers, model.decoder.lstm.hidden_size
        h, c = torch.zeros(layers, len(y), hidden), torch.zeros(layers, len(y), hidden)
        states = []
        for u in range(y.shape[1]):  # states[u]: after consuming y[:, :u]
            states.append((h, c))
            _, (h, c) = model.decoder.lstm(model.decoder.embedding(y[:, u]).unsqueeze(0), (h, c))
    rows, frames = batch["valid"].nonzero(as_tuple=True)
    pick = torch.randperm(len(rows), generator=generator(split, seed))[:samples]
    rows, frames = rows[pick], frames[pick]
    u = batch["state"][rows, frames]
    h0 = torch.stack([states[k][0][:, b] for k, b in zip(u.tolist(), rows.tolist())])
    c0 = torch.stack([states[k][1][:, b] for k, b in zip(u.tolist(), rows.tolist())])
    inputs = {"y_prev": y[rows, u][:, None].numpy(), "h0": h0[:, :, None].numpy(),
              "c0": c0[:, :, None].numpy(), "enc_t": enc[rows, :, frames][:, None].numpy()}
    return inputs, batch["first"][rows, frames].numpy()


def decoder_train_split(checkpoint: str, samples: int = 128, seed: int = 0) -> dict[str, np.ndarray]:
    """Calibration steps (y_prev, h0, c0, enc_t) as the trained model meets them."""
    return _decoder_examples(checkpoint, TRAIN, samples, seed)[0]


def decoder_test_split(checkpoint: str, samples: int = 256) -> dict:
    """Held-out steps and the token (or blank) the alignment path emits at each."""
    inputs, labels = _decoder_examples(checkpoint, TEST, samples, 0)
    return {"inputs": inputs, "labels": labels}


def make_checkpoint(path: str | pathlib.Path) -> None:
    """Train briefly on the alignment-path task; write ``{"model_state_dict", "config"}`` with compiled encoder keys."""
    torch.manual_seed(0)
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    config = dict(CONFIG)
    model = build(config)
    templates = _templates(gen)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(150):
        loss = _path_loss(model, _batch(templates, config["subsampling_factor"], 16, gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    state = {
        COMPILED_PREFIX + k.removeprefix("encoder.") if k.startswith("encoder.") else k: v.detach().clone()
        for k, v in model.state_dict().items()
    }
    save_atomic({"model_state_dict": state, "config": config}, pathlib.Path(path))


if __name__ == "__main__":
    main(make_checkpoint, __doc__)
