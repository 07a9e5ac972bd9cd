"""The event stream (pipelines/events.py): one line an event, read back while it grows."""
from __future__ import annotations

from pipelines.events import Events, append, progress, read


def test_a_sweeps_progress_counts_cells_done_failed_and_the_stage_each_runs(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    append(sweep / "events.jsonl", "sweep_start", jobs=3)
    a, b = Events(sweep / "a", sweep), Events(sweep / "b", sweep)
    a.emit("job_start")
    b.emit("job_start")
    a.emit("stage_start", part="p", stage="lower")
    b.emit("stage_start", part="p", stage="verify")
    b.emit("job_end", status="fail")
    state = progress(read(sweep / "events.jsonl"))
    assert (state["jobs"], state["done"], state["failed"]) == (3, 1, 1)
    assert state["running"] == {"a": "lower"}
    assert a.prefix().startswith("[1/3 done, 1 failed 0:0") and a.prefix().endswith("] a")
    assert [e["event"] for e in read(sweep / "a" / "events.jsonl")] == ["job_start", "stage_start"]


def test_a_sweep_run_again_into_its_directory_counts_from_its_new_start(tmp_path):
    path = tmp_path / "events.jsonl"
    append(path, "sweep_start", jobs=2)
    append(path, "job_start", cell="a")
    append(path, "job_end", cell="a", status="pass")
    append(path, "sweep_start", jobs=4)
    assert (progress(read(path))["jobs"], progress(read(path))["done"]) == (4, 0)


def test_a_line_still_being_written_is_left_for_the_next_read(tmp_path):
    path = tmp_path / "events.jsonl"
    append(path, "job_start", cell="a")
    with open(path, "a") as handle:
        handle.write('{"t": 1, "event": "stage_st')
    assert [e["event"] for e in read(path)] == ["job_start"]
    assert read(tmp_path / "missing.jsonl") == []
