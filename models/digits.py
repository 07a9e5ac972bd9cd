"""The demo model: a small CNN classifying scikit-learn's 8x8 handwritten digits.

The data set ships inside scikit-learn, so accuracy is measured, not assumed. The split is fixed:
calibration draws from the training images only, verification uses the test images only.
`python -m models.digits checkpoints/digits_cnn.pt` trains it deterministically (~10 s).

Raw inputs: `test_pngs()` gives the same held-out images as `test_split()` (same order) encoded as
8-bit grayscale PNG files, what an app really has; `preprocess_png(png)` is the app's Python
preprocessing (PIL decode, grayscale, / 255) that turns one file into the model's `image` input.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.checkpoint_io import main, save_atomic


class DigitsCNN(nn.Module):
    """conv-conv-pool-linear-linear on (B, 1, 8, 8) images scaled to [0, 1]."""

    def __init__(self, num_classes: int = 10, channels: int = 16, hidden: int = 128):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * channels * 16, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(image))


def build(config: dict[str, Any]) -> DigitsCNN:
    """Rebuild the model from the config stored in its checkpoint."""
    return DigitsCNN(**config)


SPLIT = Path(__file__).with_name("digits_split.npz")  # sklearn's stratified split, kept (tests/test_zoo_raw.py)


def _split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """train_x, test_x, train_y, test_y: what `train_test_split(load_digits(), test_size=0.2,
    random_state=0, stratify=target)` gives, read from the data file scikit-learn ships without
    importing it (0.7 s a process: calibrate and verify each paid it) and the split's indices."""
    import gzip
    import importlib.util

    package = importlib.util.find_spec("sklearn")
    if package is None:
        raise ModuleNotFoundError("the digits data ships with scikit-learn: pip install -r requirements.txt")
    with gzip.open(Path(package.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz") as data:
        table = np.loadtxt(data, delimiter=",")
    images = (table[:, :-1].reshape(-1, 8, 8) / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8)
    labels = table[:, -1].astype(np.int64)
    with np.load(SPLIT) as split:
        train, test = split["train"], split["test"]
    return images[train], images[test], labels[train], labels[test]


def train_split(samples: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Training images as examples of shape (1, 1, 8, 8), shuffled by seed: calibration data."""
    train_x, _, _, _ = _split()
    order = np.random.default_rng(seed).permutation(len(train_x))[:samples]
    return {"image": train_x[order][:, None]}


def test_split() -> dict[str, Any]:
    """Held-out test images and labels: verification data, never seen in training or calibration."""
    _, test_x, _, test_y = _split()
    return {"inputs": {"image": test_x[:, None]}, "labels": test_y}


def _png(image: np.ndarray) -> bytes:
    """One (8, 8) image in [0, 1] as an 8-bit grayscale PNG: pixel = round(x * 255)."""
    from PIL import Image

    pixels = np.rint(np.clip(np.asarray(image, np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")  # uint8 (8, 8) arrays are mode "L"
    return buffer.getvalue()


def preprocess_png(png: bytes) -> dict[str, np.ndarray]:
    """The app's preprocessing of one PNG file: PIL decode, convert("L"), / 255.

    Returns {"image": float32 (1, 1, 8, 8)} in [0, 1], the model's input. The file must be 8x8.
    """
    from PIL import Image

    with Image.open(io.BytesIO(png)) as decoded:
        gray = np.asarray(decoded.convert("L"), dtype=np.float32)
    if gray.shape != (8, 8):
        raise ValueError(f"expected an 8x8 image, got {gray.shape[1]}x{gray.shape[0]}")
    return {"image": (gray / np.float32(255.0))[None, None]}


def test_pngs() -> dict[str, Any]:
    """The held-out images of test_split (same examples, same order) as 8-bit grayscale PNG bytes.

    {"inputs": {"png": list[bytes]}, "labels": int64 (N,)}; decoding gives the images within 1/510.
    """
    _, test_x, _, test_y = _split()
    return {"inputs": {"png": [_png(x[0]) for x in test_x]}, "labels": test_y}


def train_pngs(samples: int | None = None, seed: int = 0) -> dict[str, list[bytes]]:
    """train_split's images (same seed, same order) as PNG bytes: {"png": list[bytes]}."""
    return {"png": [_png(x[0, 0]) for x in train_split(samples, seed)["image"]]}


def make_checkpoint(path: str | Path, epochs: int = 40) -> None:
    """Train deterministically and write {model_state_dict, config} atomically.

    Label smoothing keeps the logits calibrated (|logit| < ~12): float16's rounding step at the
    overconfident logits of plain cross-entropy (~40) alone would exceed FP16's 1e-2 tolerance.
    """
    torch.manual_seed(0)
    torch.set_num_threads(2)
    config = {"num_classes": 10, "channels": 16, "hidden": 128}
    model = DigitsCNN(**config)
    train_x, _, train_y, _ = _split()
    x, y = torch.from_numpy(train_x), torch.from_numpy(train_y)
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=generator).split(64):
            optimiser.zero_grad()
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch], label_smoothing=0.1)
            loss.backward()
            optimiser.step()
    save_atomic({"model_state_dict": model.state_dict(), "config": config, "epochs": epochs}, path)


if __name__ == "__main__":
    main(make_checkpoint, __doc__)
