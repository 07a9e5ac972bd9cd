"""Prepared work (`module:function`) for the stage server that blocks until the test lets it go (tests/test_isolation.py)."""
import os
import time
from pathlib import Path


def block_until_released() -> None:
    """Wait for `released` in the test's folder (the server's identity variable names it); after
    30 s release itself, so a stage forked only after this returned sees `released`."""
    folder = Path(os.environ["PYTHON_STAGE_SERVER_TEST"])
    (folder / "blocking").touch()
    deadline = time.monotonic() + 30
    while not (folder / "released").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    (folder / "released").touch()
