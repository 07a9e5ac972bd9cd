"""Named device profiles for tests that assert what a kernel computes: the same verdict on every
build host (an x86 CPU with or without VNNI, an arm64 one), since the profile runs natively only
where the host is one and under qemu-user elsewhere (stages/runtimes/devices.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from stages.runtimes.devices import place, profile
from tests.conftest import unavailable


def run_on(name: str, fmt: str, artifact: Path, feeds: list[dict[str, np.ndarray]],
           inputs: list[dict] | None = None) -> list[list[np.ndarray]]:
    """The artifact's outputs on the named device; a device this host cannot run fails under CI
    (make test builds the runtimes) and skips elsewhere, with its reason."""
    placement = place(profile(name), fmt)
    if not placement.runs:
        unavailable(f"{name}: {placement.reason}")
    io = {"inputs": inputs or [{"name": k, "dynamic": {}} for k in feeds[0]]}
    with placement.session(artifact, io) as session:
        return session.run_many(feeds)
