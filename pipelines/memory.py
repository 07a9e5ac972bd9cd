"""Memory: each stage's own peak resident set, and how many sweep jobs fit in this host's memory.

The kernel keeps a process's resident high-water mark (VmHWM in /proc/self/status) and resets it
to the current resident size when "5" is written to /proc/self/clear_refs (Linux 4.0+): reset
before a stage, read after it, and the figure is that stage's peak, not the process's so far.
"""
from __future__ import annotations

from pathlib import Path

STATUS, CLEAR = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def reset_peak() -> None:
    try:
        CLEAR.write_text("5")
    except OSError:  # not Linux, or not allowed: peaks then run from the process's start
        pass


def peak_mb() -> float | None:
    """The resident high-water mark since the last reset, in MiB (None where unknown)."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def release() -> None:
    """Give back what the last stage freed (Python's garbage, then glibc's free lists), so the
    next stage's peak is its own and a long chain does not hold every stage's leftovers."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
