"""Latency at batch 1: warm-up, then enough calls for a stable median, one measurement at a time.

Timings on one host are serialized by a host-wide lock, so the jobs of a parallel sweep never
time while another times (they may still be computing: the load average is recorded beside the
figures). Every runtime gets the same fixed thread count.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from pipelines.locks import PosixLock
from pipelines.versions import host_cpu

LOCK = Path(tempfile.gettempdir()) / "export-pipeline-timing.lock"


def host(view: Mapping[str, Any]) -> dict[str, Any]:
    """What a latency depends on besides the artifact: the CPU and the thread count."""
    return {"cpu": host_cpu(), "threads": view["benchmark"]["threads"]}


def measure(call: Callable[[], Any], cfg) -> dict[str, Any]:
    """Milliseconds per call: `cfg.warmup` calls, then calls until `cfg.min_runs` and
    `cfg.min_seconds` are both reached (at most `cfg.max_runs`)."""
    with exclusive():
        load = os.getloadavg()[0]
        for _ in range(cfg.warmup):
            call()
        times: list[float] = []
        started = time.perf_counter()
        while len(times) < cfg.max_runs and (len(times) < cfg.min_runs
                                             or time.perf_counter() - started < cfg.min_seconds):
            begin = time.perf_counter()
            call()
            times.append((time.perf_counter() - begin) * 1000)
    return {**summary(times), "load_average": round(load, 2)}


def summary(times_ms: list[float]) -> dict[str, Any]:
    p50, p90 = np.percentile(times_ms, [50, 90])
    return {"p50_ms": round(float(p50), 4), "p90_ms": round(float(p90), 4),
            "mean_ms": round(float(np.mean(times_ms)), 4), "runs": len(times_ms)}


@contextlib.contextmanager
def exclusive() -> Iterator[None]:
    """One timing at a time on this host."""
    with PosixLock(LOCK):
        yield


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def batch_of_one(specs: list[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """One seeded example of each input at its spec's shape (batch 1 where the batch is dynamic)."""
    from .tensors import synthetic

    return synthetic(specs, [tuple(spec["shape"]) for spec in specs], seed=0)
