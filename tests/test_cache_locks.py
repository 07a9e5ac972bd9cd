"""Parallel jobs, as separate processes: a shared stage is computed once, and a hit never
waits for a key's lock."""
from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from pathlib import Path

from omegaconf import OmegaConf

from pipelines.registry import Stage
from pipelines.runner import Runner

KEY = "cd" * 32


def runner(root: Path) -> Runner:
    cfg = OmegaConf.create({"cache": {"enabled": True, "dir": str(root / "cache"), "refresh": [],
                                      "verify": "stat"}, "model": {}, "isolate_stages": False})
    (root / "run").mkdir(exist_ok=True)
    return Runner(cfg, root / "run", logging.getLogger("test"))


def counted_stage(root: Path) -> Stage:
    def compute(ctx):
        with open(root / "computed", "a") as log:  # one line per real computation
            log.write(f"{os.getpid()}\n")
        (ctx.workdir / "out.bin").write_bytes(b"result")
        return {"pid": os.getpid()}

    return Stage("counted", compute, needs=(), config=(), code=())


def call(root: Path, results, both_missed) -> None:
    job = runner(root)
    take = job.cache.lock

    def lock(key):  # each job has looked the key up and missed before either takes the lock
        both_missed.wait(20)
        return take(key)

    job.cache.lock = lock
    output, hit, _ = job._cached_call(counted_stage(root), KEY, {}, {}, {}, "part")
    results.put((hit, output.result, (output.dir / "out.bin").read_bytes()))


def test_two_processes_compute_a_shared_stage_once(tmp_path):
    """Both miss at first; the one that waited for the lock finds the other's entry and hits."""
    context = multiprocessing.get_context("fork")
    results, both_missed = context.Queue(), context.Barrier(2)
    jobs = [context.Process(target=call, args=(tmp_path, results, both_missed)) for _ in range(2)]
    for job in jobs:
        job.start()
    outcomes = sorted((results.get(timeout=20) for _ in jobs), key=lambda outcome: outcome[0])
    for job in jobs:
        job.join(10)
    assert len((tmp_path / "computed").read_text().split()) == 1
    assert [hit for hit, _, _ in outcomes] == [False, True]
    assert outcomes[0][1:] == outcomes[1][1:]


def _hold(path: Path, held, done) -> None:
    from pipelines.locks import PosixLock

    with PosixLock(path):
        held.set()
        done.wait(20)


def test_a_hit_does_not_wait_for_the_keys_lock(tmp_path):
    first = runner(tmp_path)
    first._cached_call(counted_stage(tmp_path), KEY, {}, {}, {}, "part")
    context = multiprocessing.get_context("fork")
    held, done = context.Event(), context.Event()
    holder = context.Process(target=_hold, args=(first.cache.lock(KEY).path, held, done))
    holder.start()
    assert held.wait(10)
    outcome = []
    lookup = threading.Thread(target=lambda: outcome.append(
        runner(tmp_path)._cached_call(counted_stage(tmp_path), KEY, {}, {}, {}, "part")))
    lookup.start()
    lookup.join(60)  # returns at once unless the hit waits: then only `done` would free it
    finished_while_held = not lookup.is_alive() and not done.is_set()
    done.set()
    holder.join(10)
    lookup.join()
    assert finished_while_held and outcome[0][1] is True  # a hit, while another process held the lock
