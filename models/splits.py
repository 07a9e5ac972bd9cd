"""Seeded splits of the zoo's synthetic tasks: calibration (training split) and held-out
verification draws come from different generator streams, so they never see the same examples."""
from __future__ import annotations

import torch

TRAIN, TEST = 0, 1


def generator(split: int, seed: int = 0) -> torch.Generator:
    """Training-split draws use even generator seeds, held-out draws odd ones."""
    return torch.Generator().manual_seed(2 * seed + split)
