"""The store at scale: a hit trusts what was sealed without reading it, a changed file is never
used, housekeeping lists and prunes without touching what a running job uses, a full disk
leaves nothing behind."""
from __future__ import annotations

import dataclasses
import errno
import logging
import multiprocessing
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from pipelines import cache as store
from pipelines.cache import Cache, main
from pipelines.locks import cross_host_unsafe

DAY = 86400


@pytest.fixture(autouse=True)
def own_pins(monkeypatch):
    """This test's pins, apart from the other tests', removed when it ends."""
    pins: dict = {}
    monkeypatch.setattr(store, "_PINS", pins)
    yield
    for pin in pins.values():
        pin.remove()


@pytest.fixture
def hashed(monkeypatch) -> list[str]:
    """The files a lookup reads to hash them."""
    calls: list[str] = []

    def counted(path, _real=store.sha256_file):
        calls.append(Path(path).name)
        return _real(path)

    monkeypatch.setattr(store, "sha256_file", counted)
    return calls


def put(cache: Cache, key: str, stage: str = "wrap", size: int = 1000, age: float = 60) -> Path:
    """Commit an entry holding one file of size bytes, written age seconds ago."""
    work = cache.new_workdir()
    path = work / "files" / "model.bin"
    path.write_bytes(os.urandom(size))
    os.utime(path, (time.time() - age, time.time() - age))
    return cache.commit(key, work, {"stage": stage, "result": {}}).files / "model.bin"


def key(n: int) -> str:
    return f"{n:02x}" * 32


def job_ended(cache: Cache) -> None:
    """This process stops using the cache, as a finished job does: its pins go."""
    store._PINS.pop(cache.root).remove()


def last_used(cache: Cache, k: str, seconds_ago: float) -> None:
    when = time.time() - seconds_ago
    os.utime(cache.entry_dir(k), (when, when))


def test_a_warm_lookup_reads_no_file(tmp_path, hashed):
    cache = Cache(tmp_path)
    put(cache, key(1))
    hashed.clear()
    assert Cache(tmp_path).lookup(key(1)) is not None
    assert hashed == []


def test_a_file_changed_the_normal_way_is_never_used(tmp_path, hashed):
    cache = Cache(tmp_path)
    path = put(cache, key(1))
    path.write_bytes(path.read_bytes()[:-4] + b"evil")  # same size: only the mtime shows it
    hashed.clear()
    assert cache.lookup(key(1)) is None
    assert hashed == ["model.bin"]


def test_a_change_that_restores_size_and_mtime_is_caught_by_full_verify(tmp_path):
    cache = Cache(tmp_path)
    path = put(cache, key(1))
    before = path.stat()
    with open(path, "r+b") as handle:  # corrupt in place: same inode, same size
        handle.write(b"\0" * 8)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert cache.lookup(key(1)) is not None  # what verify=stat cannot see, by design
    assert Cache(tmp_path, "full").lookup(key(1)) is None


def test_hard_links_and_copies_out_of_an_entry_keep_it_trusted(tmp_path, hashed):
    cache = Cache(tmp_path / "cache")
    path = put(cache, key(1))
    os.link(path, tmp_path / "linked.bin")  # what link_or_copy does between entries
    shutil.copy2(path, tmp_path / "copied.bin")  # what the runner does for artifacts
    hashed.clear()
    assert cache.lookup(key(1)) is not None and hashed == []


def test_a_file_as_new_as_its_seal_is_hashed(tmp_path, hashed):
    """Racily clean, as git calls it: a same-size rewrite within the sealing tick keeps the
    stat, so such a file is hashed on every lookup until its mtime is settled."""
    cache = Cache(tmp_path)
    put(cache, key(1), age=-5)  # mtime after entry.json's
    hashed.clear()
    assert cache.lookup(key(1)) is not None and cache.lookup(key(1)) is not None
    assert hashed == ["model.bin", "model.bin"]


def test_a_copied_cache_is_hashed_once_then_trusted(tmp_path, hashed):
    put(Cache(tmp_path / "a"), key(1))
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # new inodes, same mtimes
    copy = Cache(tmp_path / "b")
    hashed.clear()
    assert copy.lookup(key(1)) is not None and hashed == ["model.bin"]
    assert copy.lookup(key(1)) is not None and hashed == ["model.bin"]


def test_list_counts_entries_and_bytes_by_stage(tmp_path, capsys):
    cache = Cache(tmp_path)
    put(cache, key(1), "wrap", 1000)
    put(cache, key(2), "wrap", 3000)
    shared = put(cache, key(3), "lower", 2048)
    work = cache.new_workdir()
    os.link(shared, work / "files" / "model.bin")  # hard-linked into a fourth entry
    cache.commit(key(4), work, {"stage": "verify", "result": {}})
    for n in range(1, 5):
        last_used(cache, key(n), (5 - n) * 3600)
    assert main(["list", "--cache-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["stage", "entries", "size"]
    assert lines[1].split() == ["lower", "1", "2.0", "KiB"]
    assert lines[3].split() == ["wrap", "2", "3.9", "KiB"]
    assert lines[4].startswith("total") and "5.9 KiB" in lines[4] and "2.0 KiB hard-linked" in lines[4]
    main(["list", "--all", "--cache-dir", str(tmp_path)])
    each = capsys.readouterr().out.splitlines()
    assert each[1].startswith(key(1)[:12]) and "wrap" in each[1] and "1000 B" in each[1]
    assert len(each) == 1 + 4 + 1 + 3 + 1


def test_prune_older_than_removes_what_went_unused(tmp_path, capsys):
    cache = Cache(tmp_path)
    put(cache, key(1))
    put(cache, key(2))
    job_ended(cache)
    last_used(cache, key(1), 8 * DAY)
    last_used(cache, key(2), 6 * DAY)
    assert main(["prune", "--cache-dir", str(tmp_path), "--older-than", "7d", "--dry-run"]) == 0
    assert "would remove 1 entries" in capsys.readouterr().out and cache.entry_dir(key(1)).exists()
    assert main(["prune", "--cache-dir", str(tmp_path), "--older-than", "7d"]) == 0
    assert "removed 1 entries" in capsys.readouterr().out
    assert cache.lookup(key(1)) is None and cache.lookup(key(2)) is not None
    assert not any((tmp_path / "trash").iterdir())


def test_prune_max_size_evicts_least_recently_used_first(tmp_path):
    cache = Cache(tmp_path)
    for n, hours in ((1, 3), (2, 1), (3, 2)):
        put(cache, key(n), size=1000)
        last_used(cache, key(n), hours * 3600)
    job_ended(cache)
    removed, kept = cache.prune(None, 1500, dry_run=False)
    assert [e.key for e in removed] == [key(1), key(3)] and kept == 0
    assert cache.entry_dir(key(2)).exists()


def test_prune_counts_a_hard_linked_file_once(tmp_path):
    cache = Cache(tmp_path)
    shared = put(cache, key(1), size=1000)
    work = cache.new_workdir()
    os.link(shared, work / "files" / "model.bin")
    cache.commit(key(2), work, {"stage": "lower", "result": {}})
    put(cache, key(3), size=1000)
    for n in (1, 2, 3):
        last_used(cache, key(n), (4 - n) * 3600)
    job_ended(cache)
    assert cache.prune(None, 2000, dry_run=True) == ([], 0)  # 2000 bytes on disk, not 3000
    removed, _ = cache.prune(None, 1000, dry_run=True)  # the shared file goes with key(2) only
    assert [e.key for e in removed] == [key(1), key(2)]


def test_verify_is_chosen_in_the_config(tmp_path):
    from hydra.errors import ConfigCompositionException

    from pipelines.runner import Runner
    from tests.conftest import compose_config

    def runner(*overrides):
        cfg = compose_config("model=tiny", f"cache.dir={tmp_path}", *overrides)
        return Runner(cfg, tmp_path, logging.getLogger("test"))

    assert not runner().cache.full and runner("cache.verify=full").cache.full
    with pytest.raises(ConfigCompositionException):
        compose_config("model=tiny", "cache.verify=sha")


def test_a_hit_marks_the_entry_used(tmp_path):
    cache = Cache(tmp_path)
    put(cache, key(1))
    last_used(cache, key(1), 8 * DAY)
    cache.lookup(key(1))
    assert time.time() - cache.entry_dir(key(1)).stat().st_mtime < 60


def _use_and_wait(root, k, ready, done):
    assert Cache(root).lookup(k) is not None
    ready.set()
    done.wait(10)


def test_prune_keeps_what_a_live_job_uses_and_forgets_a_dead_ones_pin(tmp_path):
    cache = Cache(tmp_path)
    put(cache, key(1))
    put(cache, key(2))
    job_ended(cache)
    context = multiprocessing.get_context("fork")
    ready, done = context.Event(), context.Event()
    job = context.Process(target=_use_and_wait, args=(tmp_path, key(1), ready, done))
    job.start()
    assert ready.wait(10)
    removed, kept = cache.prune(0, None, dry_run=False)
    assert [e.key for e in removed] == [key(2)] and kept == 1
    assert cache.entry_dir(key(1)).exists()
    done.set()
    job.join(10)  # exits without cleaning up, as a killed job would: its pin file stays, unlocked
    assert len(list((tmp_path / "pins").iterdir())) == 1
    removed, kept = cache.prune(0, None, dry_run=False)
    assert [e.key for e in removed] == [key(1)] and kept == 0
    assert not any((tmp_path / "pins").iterdir())


def test_prune_refuses_where_locks_stay_on_one_host(tmp_path, monkeypatch, capsys):
    Cache(tmp_path)
    monkeypatch.setattr(store, "cross_host_unsafe", lambda root: "/mnt is an nfs4 mount with nolock")
    assert main(["prune", "--cache-dir", str(tmp_path), "--older-than", "1d"]) == 1
    assert "refusing to prune" in capsys.readouterr().err


@pytest.mark.parametrize("fstype, options, unsafe", [
    ("nfs4", "rw,vers=4.2,local_lock=none,addr=10.0.0.1", False),
    ("nfs4", "rw,vers=4.2,local_lock=all,addr=10.0.0.1", True),
    ("nfs", "rw,vers=3,nolock,addr=10.0.0.1", True),
    ("nfs", "rw,vers=3,nocto,addr=10.0.0.1", True),
    ("ext4", "rw,nolock", False),
])
def test_cross_host_safety_is_read_from_the_mount_options(tmp_path, fstype, options, unsafe):
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"1 0 8:1 / / rw - ext4 /dev/sda1 rw\n"
                         f"2 1 0:50 / /shared rw,relatime - {fstype} srv:/export {options}\n")
    assert bool(cross_host_unsafe(Path("/shared/cache"), str(mountinfo))) is unsafe
    assert cross_host_unsafe(Path("/sharedother"), str(mountinfo)) is None


# a full disk


@pytest.fixture
def no_space():
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def assert_left_nothing(run, cache_dir: Path) -> None:
    assert run.status == "fail"
    assert "\n" not in run.error and run.error.startswith("[load_checkpoint] no space left on")
    assert str(cache_dir) in run.error and " free)" in run.error
    assert not [p for p in cache_dir.glob("??/*")]
    assert not any((cache_dir / "tmp").iterdir())


def test_a_stage_that_fills_the_disk_fails_clearly_and_leaves_nothing(run_tiny, tmp_path, monkeypatch,
                                                                     no_space, in_process):
    import stages  # noqa: F401
    from pipelines.registry import STAGES

    def writes_until_full(ctx):
        (ctx.workdir / "state_dict.pt").write_bytes(b"partial")
        raise no_space

    monkeypatch.setitem(STAGES, "load_checkpoint",
                        dataclasses.replace(STAGES["load_checkpoint"], fn=writes_until_full))
    assert_left_nothing(run_tiny(), tmp_path / "cache")


def test_a_disk_full_while_sealing_leaves_nothing(run_tiny, tmp_path, monkeypatch, no_space):
    def full(path, value):
        path.write_text("{")  # part of it was written
        raise no_space

    monkeypatch.setattr(store, "write_json", full)
    assert_left_nothing(run_tiny(), tmp_path / "cache")


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs (we may be root); skipped where it cannot be mounted."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.mark.parametrize("pinned", [True, False], ids=["stage-fails", "pin-fails"])
def test_a_real_full_disk_leaves_nothing(run_tiny, tiny_disk, pinned):
    """torch.save reports a full disk without its errno: the free space tells."""
    cache = Cache(tiny_disk / "cache")
    if pinned:
        cache.lookup(key(1))  # the pin file has its page: the first stage's write fails
    filler = os.open(tiny_disk / "filler", os.O_WRONLY | os.O_CREAT)
    with pytest.raises(OSError):
        while True:
            os.write(filler, b"\0" * 4096)
    os.close(filler)
    assert_left_nothing(run_tiny(cache=tiny_disk / "cache"), tiny_disk / "cache")


def test_passing_a_file_on_replaces_one_already_there(tmp_path):
    """A sweep run again into its directory links the same cached plot over its own link."""
    from pipelines.digests import link_or_copy

    source, target = tmp_path / "plot.png", tmp_path / "sweep" / "plot.png"
    source.write_bytes(b"new")
    target.parent.mkdir()
    link_or_copy(source, target)
    link_or_copy(source, target)  # the same file again: was shutil.SameFileError
    assert target.read_bytes() == b"new" and os.path.samefile(source, target)
    (tmp_path / "other.png").write_bytes(b"other")
    link_or_copy(tmp_path / "other.png", target)
    assert target.read_bytes() == b"other" and sorted(p.name for p in target.parent.iterdir()) == ["plot.png"]
