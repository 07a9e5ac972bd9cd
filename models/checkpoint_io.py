"""Writing the zoo's checkpoints: atomically, byte-for-byte reproducibly, and from the command line."""
from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
from typing import Callable, Iterator

import torch


def save_atomic(obj: dict, path: str | os.PathLike) -> None:
    """torch.save to a temp file beside the target, then os.replace it into place: a crash never
    leaves a half checkpoint. Written through a file object, so the archive's inner folder is
    "archive" and the bytes do not depend on the temp name; plain open() follows the umask."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to count inside the block, restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int, max_lr: float,
        loss_at: Callable[[int], torch.Tensor]) -> dict[str, torch.Tensor]:
    """`steps` optimizer steps under a one-cycle learning rate, loss_at(step) giving each step's
    loss; returns the trained state dict (the model is left in eval mode)."""
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=steps)
    model.train()
    for step in range(steps):
        loss = loss_at(step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def main(make_checkpoint: Callable[[pathlib.Path], None], doc: str | None) -> None:
    """`python -m models.<name> OUT_PATH`: write that model's checkpoint."""
    parser = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0] if doc else None)
    parser.add_argument("out_path", type=pathlib.Path, help="where to write the checkpoint")
    make_checkpoint(parser.parse_args().out_path)
