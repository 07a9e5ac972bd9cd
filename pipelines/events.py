"""The machine-readable event stream of a run and of a sweep: `events.jsonl`, one JSON object a
line, appended as things happen (the export panel and any program follow it; a person reads the
console, where a sweep's lines carry its progress).

Every event has `t` (Unix seconds), `event` and, from a job, `cell` (its directory's name):

    sweep_start   jobs                                  (the sweeper: how many cells it launches)
    job_start     recipe, model, precision, format, run_dir
    stage_start   part, stage
    stage_end     part, stage, hit, seconds, peak_mb, summary
    stage_error   part, stage, error
    part_end      part, status
    job_end       status, seconds, error

A job writes its own run's `events.jsonl` and, in a sweep, the sweep's too: each event is one
write of one line to a file opened for appending, so lines of concurrent jobs never mix.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

EVENTS = "events.jsonl"


def append(path: Path, event: str, **fields: Any) -> None:
    """One event as one line at the end of `path` (created when missing)."""
    line = json.dumps({"t": round(time.time(), 3), "event": event, **fields}, default=str) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read(path: Path) -> list[dict[str, Any]]:
    """The events of a stream so far (a line being written is left for the next read)."""
    return read_from(path, 0)[0]


def read_from(path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    """The whole lines appended to a stream after byte `offset`, as events, and where they end."""
    try:
        with open(path, "rb") as stream:
            stream.seek(offset)
            tail = stream.read()
    except FileNotFoundError:
        return [], offset
    complete = tail[:tail.rfind(b"\n") + 1]  # a line still being written waits for the next read
    return [json.loads(line) for line in complete.splitlines()], offset + len(complete)


def progress(events: list[dict[str, Any]], now: float | None = None) -> dict[str, Any]:
    """A sweep at a glance (its last start on, a sweep run again into its directory): cells
    launched, done (and failed), running (each with its stage), seconds since it started."""
    starts = [k for k, e in enumerate(events) if e["event"] == "sweep_start"]
    events = events[starts[-1]:] if starts else events
    launched = sum(e.get("jobs", 0) for e in events if e["event"] == "sweep_start")
    started = [e for e in events if e["event"] == "job_start"]
    ended = {e["cell"]: e for e in events if e["event"] == "job_end"}
    stage: dict[str, str] = {}
    for e in events:
        if e["event"] == "stage_start":
            stage[e["cell"]] = e["stage"]
    running = {e["cell"]: stage.get(e["cell"], "starting") for e in started if e["cell"] not in ended}
    first = min((e["t"] for e in events), default=now or time.time())
    return {"jobs": max(launched, len(started)), "done": len(ended),
            "failed": sum(e["status"] == "fail" for e in ended.values()), "running": running,
            "seconds": (now or time.time()) - first}


class Events:
    """The stream one job writes: its run's, and its sweep's when it is one of a sweep."""

    def __init__(self, run_dir: Path, sweep_dir: Path | None = None):
        self.paths = [Path(run_dir) / EVENTS] + ([Path(sweep_dir) / EVENTS] if sweep_dir else [])
        self.sweep = Path(sweep_dir) / EVENTS if sweep_dir else None
        self.cell = Path(run_dir).name
        self._seen: list[dict[str, Any]] = []  # the sweep's events read so far, and where they end
        self._offset = 0
        for path in self.paths:
            path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, event: str, **fields: Any) -> None:
        for path in self.paths:
            append(path, event, cell=self.cell, **fields)

    def prefix(self) -> str:
        """`[3/8 done 1:23] int8_onnx ` in a sweep (its console lines interleave), else ''."""
        if self.sweep is None:
            return ""
        state = progress(self._sweep_events())
        minutes, seconds = divmod(int(state["seconds"]), 60)
        failed = f", {state['failed']} failed" if state["failed"] else ""
        return f"[{state['done']}/{state['jobs']} done{failed} {minutes}:{seconds:02d}] {self.cell}"

    def _sweep_events(self) -> list[dict[str, Any]]:
        """The sweep's stream, reading only what was appended since the last call (a long sweep's
        jobs ask at every stage)."""
        new, self._offset = read_from(self.sweep, self._offset)
        self._seen += new
        return self._seen
