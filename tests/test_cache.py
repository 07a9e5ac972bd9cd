"""The cache rules: hits skip the work, changes recompute exactly what depends on them,
damaged entries are never used, failures leave nothing behind."""
from __future__ import annotations

import dataclasses
import functools
from collections import Counter
from pathlib import Path

import pytest

from pipelines.cache import Cache
from pipelines.registry import STAGES
from pipelines.runner import CHAIN


@pytest.fixture
def calls(monkeypatch, in_process) -> Counter:
    """How often each stage's function really ran."""
    import stages  # noqa: F401

    counter: Counter = Counter()
    for name, stage in list(STAGES.items()):
        @functools.wraps(stage.fn)
        def counted(ctx, _fn=stage.fn, _name=name):
            counter[_name] += 1
            return _fn(ctx)
        monkeypatch.setitem(STAGES, name, dataclasses.replace(stage, fn=counted))
    return counter


def hits(run) -> dict[str, bool]:
    return {r.stage: r.hit for r in run.records}


def artifact_bytes(run) -> bytes:
    lower = run.outputs["lower"]
    return (lower.dir / lower.result["artifact"]).read_bytes()


def test_second_identical_run_is_all_hits_and_does_no_work(run_tiny, calls):
    first = run_tiny()
    assert first.status == "pass", first.error
    assert set(calls) == set(CHAIN) and all(n == 1 for n in calls.values())
    second = run_tiny()
    assert all(hits(second).values())
    assert all(n == 1 for n in calls.values())  # no stage function ran again
    assert artifact_bytes(first) == artifact_bytes(second)


def test_changing_one_stage_config_recomputes_it_and_what_follows_not_what_precedes(run_tiny, calls):
    run_tiny("format=pte")
    changed = run_tiny("format=pte", "quantize.per_channel=false")
    expected_hits = {"load_checkpoint", "clean_state_dict", "wrap", "calibrate", "convert",
                     "baseline"}  # eager timing: untouched; the devices check the new artifact
    assert {s for s, hit in hits(changed).items() if hit} == expected_hits
    assert calls["quantize"] == 2 and calls["wrap"] == 1


def test_changing_verify_config_recomputes_only_verify(run_tiny, calls):
    run_tiny()
    changed = run_tiny("verify.seed=7")
    assert [s for s, hit in hits(changed).items() if not hit] == ["verify", "verify_target"]  # its inputs


def test_new_checkpoint_bytes_recompute_everything_that_reads_weights(run_tiny, tmp_path, calls):
    from tests.tiny import write_checkpoint

    run_tiny()
    other = run_tiny(checkpoint=write_checkpoint(tmp_path / "tiny.pt", seed=1))
    # same path, new bytes: every stage downstream of the weights runs again; the calibration
    # inputs are data, not weights, so that entry is legitimately reused
    assert [s for s, hit in hits(other).items() if hit] == ["calibrate"]
    assert calls["load_checkpoint"] == 2 and calls["lower"] == 2


def test_cache_disabled_bypasses_the_store(run_tiny, tmp_path, calls):
    run = run_tiny("cache.enabled=false")
    assert run.status == "pass" and not any(hits(run).values())
    assert not (tmp_path / "cache").exists()
    run_tiny("cache.enabled=false")
    assert calls["lower"] == 2


@pytest.mark.parametrize("damage", ["alter", "delete"])
def test_a_damaged_entry_is_recomputed_never_used(run_tiny, damage, calls):
    first = run_tiny()
    expected = artifact_bytes(first)  # read now: the damage is done to the entry first's files are
    model_file = first.outputs["lower"].dir / "model.onnx"
    if damage == "alter":
        model_file.write_bytes(model_file.read_bytes()[:-10] + b"0123456789")
    else:
        model_file.unlink()
    second = run_tiny()
    assert hits(second)["lower"] is False and calls["lower"] == 2
    assert second.status == "pass"
    assert artifact_bytes(second) == expected


def test_refresh_recomputes_the_named_stage(run_tiny, calls):
    run_tiny()
    again = run_tiny("cache.refresh=[quantize]")
    assert not hits(again)["quantize"] and hits(again)["wrap"] and calls["quantize"] == 2


def test_a_failing_stage_leaves_no_entry_and_no_temporary(run_tiny, tmp_path):
    run = run_tiny("calibration=files", "calibration.files=[/nonexistent/calib.npz]")
    assert run.status == "fail" and "[calibrate]" in run.error and "does not exist" in run.error
    cache = tmp_path / "cache"
    entries = [p for p in cache.glob("??/*") if p.is_dir()]
    assert len(entries) == 3  # load_checkpoint, clean_state_dict, wrap: nothing for calibrate
    assert not any((cache / "tmp").iterdir())


def test_lookup_rejects_entry_json_for_another_key(tmp_path):
    cache = Cache(tmp_path)
    work = cache.new_workdir()
    (work / "files" / "a.txt").write_text("x")
    entry = cache.commit("ab" * 32, work, {"result": {}})
    assert cache.lookup("ab" * 32) is not None
    Path(entry.files.parent, "entry.json").write_text('{"key": "other"}')
    assert cache.lookup("ab" * 32) is None


def test_calibration_changes_recompute_only_the_cells_that_use_it(run_tiny, calls):
    """fp32 never reads calibration data: a new calibration leaves its quantize entry alone;
    int8 reads it, so its quantize runs again."""
    run_tiny()
    fp32 = run_tiny("calibration.samples=16")
    assert [s for s, hit in hits(fp32).items() if not hit] == ["calibrate"]
    run_tiny("precision=int8")
    int8 = run_tiny("precision=int8", "calibration.samples=16")
    # the samples=16 calibration entry was made by the fp32 run above and is shared
    assert {s for s, hit in hits(int8).items() if not hit} == {"quantize", "preprocess", "lower", "verify",
                                                              "verify_target", "benchmark", "size_audit"}


def test_another_host_on_a_shared_cache_recomputes_what_its_cpu_decides(run_tiny, monkeypatch, calls):
    """verify runs a server artifact on the host's own int8 kernels: a host whose CPU differs
    (VNNI or not) gets its own verify and device check, and reuses every stage before them."""
    import stages.verify
    from pipelines import versions
    from stages.runtimes import devices

    first = run_tiny("precision=int8")
    this = versions.host_cpu()
    other = {**this, "model": "another CPU", "vnni": not this["vnni"], "avx512": not this["avx512"]}
    monkeypatch.setattr(stages.verify, "host_cpu", lambda: other)
    monkeypatch.setattr(devices, "host_cpu", lambda: other)
    second = run_tiny("precision=int8")
    missed = [s for s, hit in hits(second).items() if not hit]
    assert first.status == second.status == "pass" and missed == ["verify", "verify_target"]
    assert calls["verify"] == 2 and calls["lower"] == 1


def test_a_failure_on_the_same_inputs_is_reported_from_its_record_without_running(run_tiny, tmp_path, calls):
    failing = ("calibration=files", f"calibration.files=[{tmp_path}/calib.npz]")
    first = run_tiny(*failing)
    assert first.status == "fail" and "does not exist" in first.error and calls["calibrate"] == 1
    again = run_tiny(*failing)
    assert calls["calibrate"] == 1  # not run again: the record answered
    assert again.error.splitlines()[0] == first.error.splitlines()[0]
    assert "not run again: cache.refresh=[calibrate] retries it" in again.error
    retried = run_tiny(*failing, "cache.refresh=[calibrate]")
    assert calls["calibrate"] == 2 and "not run again" not in retried.error
    from tests.tiny import calibration
    import numpy as np

    np.savez(tmp_path / "calib.npz", **calibration())  # the input changed: a new key, and it runs
    fixed = run_tiny(*failing)
    assert fixed.status == "pass", fixed.error
    assert calls["calibrate"] == 3


def test_a_transient_failure_is_never_recorded(run_tiny, tmp_path, monkeypatch, in_process):
    """Out of memory, a killed worker, a full disk: the machine's doing, tried again next run."""
    import stages  # noqa: F401
    from pipelines.errors import PipelineError

    runs = Counter()

    def killed(ctx):
        runs["calibrate"] += 1
        raise PipelineError("the stage's process died (killed)", transient=True)

    monkeypatch.setitem(STAGES, "calibrate", dataclasses.replace(STAGES["calibrate"], fn=killed))
    for _ in range(2):
        run = run_tiny("precision=int8")
        assert run.status == "fail" and "died" in run.error and "not run again" not in run.error
    assert runs["calibrate"] == 2
    assert not list((tmp_path / "cache" / "failures").rglob("*.json"))
