"""The corpus's architectures, their checkpoint writer and their token inputs.

Every model entry (corpus/conf/model/<name>.yaml) builds its `arch` from one of the classes below;
`make_checkpoint` instantiates that same `arch` under a fixed seed and saves its state dict, so the
entry is the single source of each model's hyper-parameters and nothing is ever downloaded.
"""
from __future__ import annotations

import functools
import importlib
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from models.checkpoint_io import main, save_atomic

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # configs only, never a hub: fail rather than fetch
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ENTRIES = Path(__file__).resolve().parent / "conf" / "model"
SEED = 0


def _plain(value: Any) -> Any:
    """OmegaConf containers (what Hydra passes) as plain dicts/lists: HF configs validate types."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def _dotted(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


class HFModel(nn.Module):
    """A transformers model class built from its config class and fields (random init, no hub).

    forward passes its arguments through and returns the `outputs` fields of the model's output
    (a tuple of tensors), or the module's own tensor when `outputs` is empty (sub-modules such as
    Wav2Vec2FeatureEncoder return a bare tensor). `patch` names a function applied to the built
    module to make it exportable, as export tools patch such models (see static_encodec_padding).
    """

    def __init__(self, model: str, config: str, fields: Mapping[str, Any], outputs: Sequence[str] = (),
                 patch: str | None = None):
        super().__init__()
        self.net = _dotted(model)(_dotted(config)(**_plain(fields)))
        self.outputs = list(_plain(outputs))
        if patch:
            _dotted(patch)(self.net)

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor):
        out = self.net(*args, **kwargs)
        return tuple(out[key] for key in self.outputs) if self.outputs else out


def static_encodec_padding(net: nn.Module) -> None:
    """EncodecConv1d keeps its kernel size, stride and padding as tensor buffers and computes its
    padding from them (transformers 5.23 modeling_encodec.py:122-136), so torch.export meets a branch on
    a tensor's value (`if length <= max_pad`, line 150). Turn them into Python ints, the padding
    arithmetic unchanged: the same numbers, known at export time. The buffers are non-persistent,
    so the state dict is unchanged."""
    from transformers.models.encodec.modeling_encodec import EncodecConv1d

    def extra_padding(hidden_states: torch.Tensor, kernel: int, stride: int, total: int) -> int:
        length = hidden_states.shape[-1]
        frames = math.ceil((length - kernel + total) / stride + 1) - 1
        return frames * stride + kernel - total - length

    for conv in [m for m in net.modules() if isinstance(m, EncodecConv1d)]:
        kernel, stride, total = (int(conv._buffers.pop(n)) for n in ("kernel_size", "stride", "padding_total"))
        conv.kernel_size, conv.stride, conv.padding_total = kernel, stride, total
        conv._get_extra_padding_for_conv1d = functools.partial(extra_padding, kernel=kernel, stride=stride,
                                                               total=total)


class VisionModel(nn.Module):
    """A torchvision or timm architecture from its builder and arguments, random init, no weights
    fetched (`weights=None` for torchvision, `pretrained=False` for timm). forward returns the
    `outputs` entries of a dict result (segmentation models' {"out": ...}), else the tensor."""

    def __init__(self, builder: str, kwargs: Mapping[str, Any] | None = None, outputs: Sequence[str] = ()):
        super().__init__()
        kwargs = dict(_plain(kwargs) or {})
        if builder.startswith("timm."):
            import timm

            self.net = timm.create_model(builder.removeprefix("timm."), pretrained=False, **kwargs)
        else:
            self.net = _dotted(builder)(weights=None, **kwargs)
        self.outputs = list(_plain(outputs))

    def forward(self, images: torch.Tensor):
        out = self.net(images)
        return tuple(out[key] for key in self.outputs) if self.outputs else out


class DetectorHeads(nn.Module):
    """A torchvision single-shot detector (SSD, SSDlite, RetinaNet, FCOS) up to its heads: images
    (N, 3, H, W) -> box regression (N, anchors, 4) and class logits (N, anchors, classes), what an
    app decodes against the anchors and filters with non-maximum suppression."""

    def __init__(self, builder: str, kwargs: Mapping[str, Any] | None = None):
        super().__init__()
        self.net = _dotted(builder)(weights=None, weights_backbone=None, **dict(_plain(kwargs) or {}))

    def forward(self, images: torch.Tensor):
        features = self.net.backbone(images)
        heads = self.net.head(list(features.values()) if isinstance(features, Mapping) else [features])
        return heads["bbox_regression"], heads["cls_logits"]


def detector_boxes(outputs: Mapping[str, np.ndarray], builder: str, kwargs: Mapping[str, Any],
                   image: Sequence[int]) -> dict[str, np.ndarray]:
    """The app's decode step of DetectorHeads: each anchor's box (x1, y1, x2, y2) in pixels from
    its regression (the detector's own anchor generator and box coder) and its best class score
    (softmax for SSD, sigmoid for the others), per image: {"boxes": (N, A, 4), "scores": (N, A)}."""
    from stages.upstream.torchvision import importable

    importable()
    net = _detector(builder, tuple(sorted(_plain(kwargs).items())))
    regression, logits = torch.as_tensor(outputs["box_regression"]), torch.as_tensor(outputs["class_logits"])
    height, width = image
    with torch.no_grad():
        images = torch.zeros(1, 3, height, width)
        features = net.backbone(images)
        features = list(features.values()) if isinstance(features, Mapping) else [features]
        from torchvision.models.detection.image_list import ImageList

        anchors = net.anchor_generator(ImageList(images, [(height, width)]), features)[0]
        boxes = torch.stack([net.box_coder.decode_single(r, anchors) for r in regression])
        scores = logits.softmax(-1)[..., 1:] if "ssd" in builder else logits.sigmoid()
    return {"boxes": boxes.numpy(), "scores": scores.max(-1).values.numpy()}


@functools.lru_cache(maxsize=4)
def _detector(builder: str, kwargs: tuple) -> nn.Module:
    torch.manual_seed(SEED)
    return _dotted(builder)(weights=None, weights_backbone=None, **dict(kwargs)).eval()


class RecurrentNet(nn.Module):
    """Frame features (B, T, F) -> Linear -> a multi-layer torch GRU or LSTM -> per-frame logits."""

    def __init__(self, cell: str = "gru", features: int = 40, hidden: int = 64, layers: int = 2,
                 classes: int = 12):
        super().__init__()
        self.proj = nn.Linear(features, hidden)
        self.rnn = {"gru": nn.GRU, "lstm": nn.LSTM}[cell](hidden, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(torch.relu(self.proj(feats)))
        return self.head(out)


class LayerNormMLP(nn.Module):
    """A user-style model: residual blocks x + Linear(GELU(Linear(LayerNorm(x)))), every LayerNorm
    over the last TWO dims (nn.LayerNorm([tokens, dim]): scale and bias of rank 2)."""

    def __init__(self, tokens: int = 64, dim: int = 512, hidden: int = 1024, blocks: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm([tokens, dim]), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
            for _ in range(blocks))
        self.norm = nn.LayerNorm([tokens, dim])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return self.norm(x)


def make_checkpoint(path: str | Path) -> None:
    """Write the seeded random weights of the corpus entry named by the file's stem
    (checkpoints/corpus/bert.pt -> corpus/conf/model/bert.yaml): deterministic bytes."""
    from omegaconf import OmegaConf

    from stages.support.model_builder import build_model

    name = Path(path).stem
    entry = ENTRIES / f"{name}.yaml"
    if not entry.is_file():
        raise FileNotFoundError(f"no corpus entry {entry} for checkpoint {path}")
    config = OmegaConf.load(entry)
    torch.manual_seed(SEED)
    model = build_model(config, None)
    _settle_batchnorm(model, config.parts[0].inputs)
    save_atomic({"model_state_dict": model.state_dict(), "corpus_entry": name, "seed": SEED}, path)


def _settle_batchnorm(model: nn.Module, specs, batch: int = 32) -> nn.Module:
    """Give BatchNorm layers what training would: PyTorch's own affine init (1, 0) and running
    statistics measured on a seeded batch of the part's inputs. Random init alone leaves them at
    mean 0 / var 1 (and EfficientNet's HF init draws gamma ~ N(0, 0.02)), which shrinks the
    activations layer by layer to ~1e-35 logits: nothing left to verify."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model.eval()
    generator = torch.Generator().manual_seed(SEED)
    args, kwargs = [], {}
    for spec in specs:
        shape, low, high = [batch, *spec.shape[1:]], spec.get("low", -1.0), spec.get("high", 1.0)
        x = (torch.randint(int(low), int(high), shape, generator=generator) if "int" in spec.dtype
             else torch.rand(shape, generator=generator) * (high - low) + low)
        if spec.get("kwarg"):
            kwargs[spec.kwarg] = x
        else:
            args.append(x)
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        nn.init.ones_(norm.weight)
        nn.init.zeros_(norm.bias)
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average: the statistics of exactly this batch
    with torch.no_grad():
        model.train()(*args, **kwargs)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    return model.eval()


def token_inputs(vocab_size: int, length: int, samples: int = 128, seed: int = 0) -> dict[str, np.ndarray]:
    """Token ids in [1, vocab_size) with right padding: each example keeps a random prefix of
    length/4..length tokens (attention_mask 1), the rest is id 0 with mask 0. Shapes (N, 1, length)."""
    rng = np.random.default_rng(seed)
    keep = rng.integers(max(length // 4, 1), length + 1, size=(samples, 1, 1))
    mask = (np.arange(length) < keep).astype(np.int64)
    ids = rng.integers(1, vocab_size, size=(samples, 1, length)) * mask
    return {"input_ids": ids.astype(np.int64), "attention_mask": mask}


def token_eval(vocab_size: int, length: int, samples: int = 64, seed: int = 1234) -> dict[str, Any]:
    """Held-out padded token batches (a seed calibration does not use), as verify's eval_data."""
    return {"inputs": token_inputs(vocab_size, length, samples, seed)}


if __name__ == "__main__":
    main(make_checkpoint, __doc__)
