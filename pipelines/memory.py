"""Memory: each stage's own peak resident set, and how many sweep jobs fit in this host's memory.

The kernel keeps a process's resident high-water mark (VmHWM in /proc/self/status) and resets it
to the current resident size when "5" is written to /proc/self/clear_refs (Linux 4.0+): reset
before a stage, read after it, and the figure is that stage's peak, not the process's so far.
"""
from __future__ import annotations

import os
from pathlib import Path

STATUS, CLEAR, MEMINFO = Path("/proc/self/status"), Path("/proc/self/clear_refs"), Path("/proc/meminfo")
PER_WEIGHT_BYTE, FIXED_MB = 3, 512  # a stage's peak: at most 3x the fp32 weights + the libraries


def reset_peak() -> None:
    try:
        CLEAR.write_text("5")
    except OSError:  # not Linux, or not allowed: peaks then run from the process's start
        pass


def new_peak() -> None:
    """Before a stage computes: what earlier stages freed given back, the high-water mark reset,
    so peak_mb() afterwards is this stage's own (a cache hit skips both: it computes nothing)."""
    release()
    reset_peak()


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


def job_estimate_mb(checkpoint: str | os.PathLike) -> int:
    """What one pipeline job needs at its peak: 3x the checkpoint's bytes (the fp32 weights) plus
    a fixed 0.5 GB; the fixed part alone for a checkpoint not made yet."""
    path = Path(checkpoint)
    weights = path.stat().st_size if path.is_file() else 0
    return PER_WEIGHT_BYTE * weights // 2**20 + FIXED_MB


def available_mb() -> int | None:
    """Memory the kernel can give without swapping (MemAvailable), in MiB; None where unknown."""
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


def sweep_jobs(checkpoint: str | os.PathLike) -> int:
    """How many sweep jobs run at once: as many as the cores, but no more than fit in free memory
    by job_estimate_mb (one at a time when even one barely fits: it gets the whole machine)."""
    cores = usable_cores()
    free = available_mb()
    return cores if free is None else max(1, min(cores, free // job_estimate_mb(checkpoint)))


def usable_cores() -> int:
    """The processors this process may run on (its affinity: a Slurm allocation, taskset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads_per_job(n_jobs: int) -> int:
    """The threads each of n_jobs jobs at once may compute on: this process's cores, shared."""
    return max(1, usable_cores() // n_jobs)


def job_memory_gb(checkpoint: str | os.PathLike) -> int:
    """A cluster job's memory request: the estimate rounded up to whole GB, with 25% headroom."""
    return -(-job_estimate_mb(checkpoint) * 5 // 4 // 1024)
