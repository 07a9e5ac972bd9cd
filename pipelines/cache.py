"""Content-addressed stage cache, and `python -m pipelines.cache list|prune` to look after it.

An entry lives in `<root>/<k[:2]>/<k>/`: the stage's files under `files/` and an `entry.json`
(what went into the key, each file's sha256 and stat, the stage's result, seconds taken). Entries
are built in a private temporary directory and renamed into place, so a crash never leaves a half
entry that looks whole, and a whole entry is read without any lock; an entry whose files are
missing or altered is never used.

Trust. Sealing records each file's sha256 (its content) and its size, mtime_ns and inode (its
stat). A lookup stats the files and trusts one whose stat is unchanged without reading it: a copy
out of the entry or a hard link to it changes none of the three (a link changes ctime, which is
not used). Any other file is hashed and must still match its sha256. As in git's index, a file
whose recorded mtime is not older than entry.json itself is "racily clean" (it could have been
rewritten within the same timestamp tick) and is always hashed. A file that hashes clean gets its
new stat recorded, entry.json being replaced atomically (only the stat changes, never the content
record), so a copied or restored cache is read once, not on every run. `verify=full` hashes every
file on every lookup: only that catches a change that kept the size and restored the mtime.

Compute once. A job that misses takes the key's lock (`locks.PosixLock`, which NFS carries between
hosts), looks again, computes, commits; parallel jobs wait on the lock and then hit.

Pins. A process keeps one pin file `pins/<host>-<pid>-<id>`, locked by it for its whole life, and
writes each key there before it looks the key up or commits it, under a shared
`locks/prune.lock`. prune holds that lock exclusively while it reads the pins and renames its
victims aside, so an entry is pinned before prune chooses, or gone before the job looks: an entry a
running job uses is never removed. A pin whose lock nobody holds belongs to a dead process (the
OS drops a process's locks however it ends, on any host) and is deleted. Pins are fsynced, and
prune opens the directory and the files afresh, which NFS's close-to-open consistency revalidates.

Last use is the entry directory's mtime, set by each hit: one utime, no write to the entry.
"""
from __future__ import annotations

import argparse
import atexit
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .errors import PipelineError
from .locks import PosixLock, cross_host_unsafe
from .versions import sha256_file

ENTRY_FILE = "entry.json"
HOST = socket.gethostname()
KEY = re.compile(r"[0-9a-f]{64}")
NEARLY_FULL = 1 << 20  # bytes free below which a failed write is taken for a full disk


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def compute_key(material: dict[str, Any]) -> str:
    """sha256 over the canonical JSON of everything that determines a stage's output."""
    return hashlib.sha256(canonical_json(material).encode()).hexdigest()


def scan(root: Path) -> dict[str, os.stat_result]:
    """The stat of every file below root, by relative POSIX path."""
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder, name)
            found[path.relative_to(root).as_posix()] = path.stat()
    return found


def stat_record(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def write_json(path: Path, value: dict[str, Any]) -> None:
    """Write path whole or not at all (a temporary beside it, renamed over it)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    try:
        tmp.write_text(json.dumps(value, indent=1, sort_keys=True, default=str))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class Entry:
    key: str
    files: Path  # directory holding the stage's output files
    meta: dict[str, Any]

    @property
    def result(self) -> dict[str, Any]:
        return self.meta["result"]


@dataclass(frozen=True)
class Stored:
    """An entry as housekeeping sees it."""

    key: str
    stage: str
    path: Path
    size: int  # its files' bytes, each inode once
    sealed: float
    used: float
    inodes: dict[tuple[int, int], int]  # (dev, ino) -> bytes; hard links share an inode


class Pins:
    """This process's pin file under one cache root: the keys it uses, kept from prune."""

    def __init__(self, root: Path):
        self.root = root
        self.pid = os.getpid()
        self.path = root / "pins" / f"{HOST}-{self.pid}-{uuid.uuid4().hex[:8]}"
        self.keys: set[str] = set()
        self.lock: PosixLock | None = None

    def add(self, key: str) -> None:
        if key in self.keys:
            return
        with PosixLock(self.root / "locks" / "prune.lock", shared=True):
            if self.lock is None:
                self.lock = PosixLock(self.path)
                self.lock.acquire()
            os.write(self.lock.fd, f"{key}\n".encode())
            os.fsync(self.lock.fd)  # seen by prune on another host (NFS flushes on fsync)
        self.keys.add(key)

    def remove(self) -> None:
        if self.lock is not None and self.pid == os.getpid():
            self.path.unlink(missing_ok=True)
            self.lock.release()
            self.lock = None


_PINS: dict[Path, Pins] = {}


def pins_for(root: Path) -> Pins:
    """This process's pins under root (a forked child gets its own)."""
    pins = _PINS.get(root)
    if pins is None or pins.pid != os.getpid():
        pins = _PINS[root] = Pins(root)
    return pins


@atexit.register
def _unpin_all() -> None:
    for pins in _PINS.values():
        pins.remove()


class Cache:
    """The store of stage entries under one root directory."""

    def __init__(self, root: Path, verify: str = "stat"):
        self.root = Path(root).resolve()
        self.full = verify == "full"  # hash every file on every lookup
        for sub in ("locks", "pins", "tmp", "trash"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._remove_orphaned_temporaries()

    def entry_dir(self, key: str) -> Path:
        return self.root / key[:2] / key

    def lock(self, key: str) -> PosixLock:
        return PosixLock(self.root / "locks" / f"{key}.lock")

    def lookup(self, key: str) -> Entry | None:
        """The entry for key if it is whole and unaltered, else None. Takes no lock: entries
        appear and disappear by rename; the key is pinned first, so prune leaves it alone."""
        try:
            pins_for(self.root).add(key)
        except OSError as exc:
            if self._out_of_space(exc):
                raise self._no_space() from exc
            raise
        directory = self.entry_dir(key)
        files = directory / "files"
        try:
            with open(directory / ENTRY_FILE, "rb") as handle:
                sealed_ns = os.fstat(handle.fileno()).st_mtime_ns
                meta = json.loads(handle.read())
            found = scan(files)
        except (OSError, ValueError):
            return None
        if (not isinstance(meta, dict) or meta.get("key") != key or not files.is_dir()
                or set(found) != set(meta.get("files", {}))):
            return None
        recorded, rehashed = meta.get("stat", {}), {}
        for name, st in found.items():
            old = recorded.get(name)
            trusted = old == stat_record(st) and old[1] < sealed_ns
            if trusted and not self.full:
                continue
            if sha256_file(files / name) != meta["files"][name]:
                return None
            if not trusted:
                rehashed[name] = st
        if rehashed:
            self._record_stat(directory, meta, rehashed)
        try:
            os.utime(directory)  # last use, for prune
        except OSError:
            pass
        return Entry(key, files, meta)

    def _record_stat(self, directory: Path, meta: dict[str, Any],
                     rehashed: dict[str, os.stat_result]) -> None:
        """Record the stat of files that just hashed clean so the next lookup trusts them unread:
        only files unchanged while hashed and last written over 2 s ago (a file written within
        the current timestamp tick could change again without its stat showing it)."""
        stat = dict(meta.get("stat", {}))
        settled = time.time_ns() - 2 * 10**9
        for name, before in rehashed.items():
            try:
                after = os.stat(directory / "files" / name)
            except OSError:
                return
            if stat_record(after) == stat_record(before) and after.st_mtime_ns < settled:
                stat[name] = stat_record(after)
            else:
                stat.pop(name, None)
        try:
            write_json(directory / ENTRY_FILE, {**meta, "stat": stat})
        except OSError:  # a read-only or full cache is still read; it is hashed again next time
            pass

    def new_workdir(self) -> Path:
        """A private temporary directory in which a stage builds its entry."""
        tmp = self.root / "tmp" / f"{HOST}-{os.getpid()}-{uuid.uuid4().hex}"
        try:
            (tmp / "files").mkdir(parents=True)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return tmp

    @contextmanager
    def building(self, stage: str) -> Iterator[Path]:
        """A new workdir for stage's entry, removed if the block fails; running out of space
        becomes one line naming the stage, the cache and the space left."""
        tmp = None
        try:
            tmp = self.new_workdir()
            yield tmp
        except BaseException as exc:
            full = isinstance(exc, Exception) and self._out_of_space(exc)
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            if full:
                raise self._no_space(stage) from exc
            raise

    def _no_space(self, stage: str | None = None) -> PipelineError:
        free = human_bytes(shutil.disk_usage(self.root).free)
        return PipelineError(f"no space left on the device for the cache in {self.root} ({free} "
                             f"free): free some (python -m pipelines.cache prune) or set cache.dir "
                             f"to a larger disk", stage=stage, transient=True)

    def _out_of_space(self, exc: BaseException) -> bool:
        """ENOSPC or EDQUOT anywhere in the chain, or a library failure with the disk (nearly)
        full: some writers (torch.save) report a full disk without its errno."""
        seen: BaseException | None = exc
        library = False
        while seen is not None:
            if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
                return True
            library |= not isinstance(seen, PipelineError)
            seen = seen.__cause__ or seen.__context__
        return library and shutil.disk_usage(self.root).free < NEARLY_FULL

    def commit(self, key: str, workdir: Path, meta: dict[str, Any]) -> Entry:
        """Seal workdir as the entry for key (caller holds the key's lock)."""
        pins_for(self.root).add(key)
        found = scan(workdir / "files")
        meta = {**meta, "key": key,
                "files": {name: sha256_file(workdir / "files" / name) for name in sorted(found)},
                "stat": {name: stat_record(st) for name, st in found.items()}}
        write_json(workdir / ENTRY_FILE, meta)  # after the files: their mtimes are older
        final = self.entry_dir(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # a stale or damaged entry: move it aside before replacing it
            self.discard(final)
        try:
            os.rename(workdir, final)
        except OSError as exc:  # another host committed it meanwhile (its lock did not reach us)
            entry = self.lookup(key) if exc.errno in (errno.EEXIST, errno.ENOTEMPTY) else None
            if entry is None:
                raise
            shutil.rmtree(workdir, ignore_errors=True)
            return entry
        return Entry(key, final / "files", meta)

    # failures: a stage that failed on its inputs fails again on the same key

    def _failure_file(self, key: str) -> Path:
        return self.root / "failures" / key[:2] / f"{key}.json"

    def failure(self, key: str) -> dict[str, Any] | None:
        """What a stage raised the last time it ran on this key (never an entry to build on)."""
        try:
            record = json.loads(self._failure_file(key).read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) and record.get("key") == key else None

    def record_failure(self, key: str, record: dict[str, Any]) -> None:
        path = self._failure_file(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {**record, "key": key})

    def forget_failure(self, key: str) -> None:
        self._failure_file(key).unlink(missing_ok=True)

    def discard(self, directory: Path) -> None:
        """Remove an entry: renamed aside at once (a lookup never sees half of it), then deleted."""
        aside = self.root / "trash" / f"{directory.name}-{uuid.uuid4().hex}"
        try:
            os.rename(directory, aside)
        except FileNotFoundError:
            return
        shutil.rmtree(aside, ignore_errors=True)

    def _remove_orphaned_temporaries(self) -> None:
        for path in (self.root / "tmp").iterdir():
            host, _, pid = path.name.rpartition("-")[0].rpartition("-")  # <host>-<pid>-<id>
            if (host or HOST) == HOST and pid.isdigit() and not _process_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)

    # housekeeping

    def stored(self) -> list[Stored]:
        """Every whole entry, least recently used first."""
        entries = []
        for directory in self.root.glob("??/*"):
            if not KEY.fullmatch(directory.name):
                continue
            try:
                meta = json.loads((directory / ENTRY_FILE).read_text())
                files = scan(directory / "files")
                used = directory.stat().st_mtime
                sealed = (directory / ENTRY_FILE).stat().st_mtime
            except (OSError, ValueError):
                continue
            inodes = {(st.st_dev, st.st_ino): st.st_size for st in files.values()}
            entries.append(Stored(directory.name, str(meta.get("stage", "?")), directory,
                                  sum(inodes.values()), sealed, used, inodes))
        return sorted(entries, key=lambda e: e.used)

    def held(self, clean: bool) -> set[str]:
        """Keys pinned by live processes; with clean, the pins of dead processes are deleted
        (caller holds prune.lock exclusively)."""
        own = _PINS.get(self.root)
        own = own if own is not None and own.pid == os.getpid() else None
        held = set(own.keys) if own else set()
        for path in (self.root / "pins").iterdir():
            if own is not None and path == own.path:
                continue  # opening it here and closing it would drop this process's own lock
            probe = PosixLock(path)
            if probe.acquire(blocking=False):
                if clean:
                    path.unlink(missing_ok=True)
                probe.release()
            else:
                try:
                    held |= set(path.read_text().split())
                except FileNotFoundError:  # its process just ended
                    pass
        return held

    def prune(self, older_than: float | None, max_size: int | None,
              dry_run: bool) -> tuple[list[Stored], int]:
        """Remove entries unused for older_than seconds, then least recently used ones until
        the cache holds at most max_size bytes, never one a live process has pinned. Returns
        what was (or would be) removed and how many pinned entries were kept."""
        entries = self.stored()
        with PosixLock(self.root / "locks" / "prune.lock"):
            held = self.held(clean=not dry_run)
            links: dict[tuple[int, int], int] = {}  # entries holding each inode
            sizes: dict[tuple[int, int], int] = {}
            for entry in entries:
                for inode, size in entry.inodes.items():
                    links[inode], sizes[inode] = links.get(inode, 0) + 1, size
            total = sum(sizes.values())
            victims, kept = [], 0
            deadline = time.time() - older_than if older_than is not None else None
            for entry in entries:
                old = deadline is not None and entry.used < deadline
                big = max_size is not None and total > max_size
                if not (old or big):
                    continue
                if entry.key in held:
                    kept += 1
                    continue
                if not dry_run:
                    try:
                        entry.path.rename(self.root / "trash" / f"{entry.key}-{uuid.uuid4().hex}")
                    except FileNotFoundError:  # replaced or removed since the scan
                        continue
                victims.append(entry)
                for inode in entry.inodes:  # a hard-linked file is freed with its last entry
                    links[inode] -= 1
                    total -= sizes[inode] if links[inode] == 0 else 0
        if not dry_run:
            for path in (self.root / "trash").iterdir():
                shutil.rmtree(path, ignore_errors=True)
        return victims, kept


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_size(text: str) -> int:
    """'10G' -> bytes (binary units: K, M, G, T, with or without 'iB')."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?", text.strip(), re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500M, 10G)")
    return int(float(match[1]) * UNITS[match[2].upper()])


def parse_age(text: str) -> float:
    """'7d' -> seconds (s, m, h, d, w)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw])", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 12h, 7d, 2w)")
    return float(match[1]) * SECONDS[match[2]]


def human_bytes(size: float | None) -> str:
    """1536 -> '1.5 KiB'; None (not measured) -> '-'."""
    if size is None:
        return "-"
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    while size >= 1024 and len(units) > 1:
        size /= 1024
        units.pop(0)
    return f"{size:.0f} B" if units[0] == "B" else f"{size:.1f} {units[0]}"


def human_age(seconds: float) -> str:
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{seconds / length:.0f}{unit}"
    return f"{seconds:.0f}s"


def list_entries(cache: Cache, each: bool) -> list[str]:
    entries, now = cache.stored(), time.time()
    lines = []
    if each:
        lines.append(f"{'key':<12}  {'stage':<17} {'size':>10}  {'age':>5}  {'idle':>5}"
                     "  (least recently used first)")
        lines += [f"{e.key[:12]}  {e.stage:<17} {human_bytes(e.size):>10}  "
                  f"{human_age(now - e.sealed):>5}  {human_age(now - e.used):>5}" for e in entries]
    by_stage: dict[str, list[Stored]] = {}
    for entry in entries:
        by_stage.setdefault(entry.stage, []).append(entry)
    lines.append(f"{'stage':<17} {'entries':>7} {'size':>10}")
    lines += [f"{stage:<17} {len(group):>7} {human_bytes(sum(e.size for e in group)):>10}"
              for stage, group in sorted(by_stage.items())]
    unique = {inode: size for e in entries for inode, size in e.inodes.items()}
    shared = sum(e.size for e in entries) - sum(unique.values())
    note = f"  ({human_bytes(shared)} hard-linked between entries, counted once)" if shared else ""
    lines.append(f"{'total':<17} {len(entries):>7} {human_bytes(sum(unique.values())):>10}{note}")
    return lines


def main(argv: list[str] | None = None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--cache-dir", type=Path, default=Path("outputs/cache"),
                        help="the cache (default: outputs/cache)")
    parser = argparse.ArgumentParser(prog="python -m pipelines.cache",
                                     description="List and prune the stage cache.")
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", parents=[common], help="entries by stage: count, size")
    listing.add_argument("--all", action="store_true", help="one line per entry")
    pruning = commands.add_parser("prune", parents=[common], help="remove old or LRU entries")
    pruning.add_argument("--older-than", type=parse_age, help="unused for this long: 12h, 7d, 2w")
    pruning.add_argument("--max-size", type=parse_size, help="evict LRU entries down to this: 10G")
    pruning.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")
    args = parser.parse_args(argv)
    if not args.cache_dir.is_dir():
        print(f"no cache at {args.cache_dir}", file=sys.stderr)
        return 1
    cache = Cache(args.cache_dir)
    if args.command == "list":
        print("\n".join(list_entries(cache, args.all)))
        return 0
    if args.older_than is None and args.max_size is None:
        parser.error("prune needs --older-than and/or --max-size")
    if (reason := cross_host_unsafe(cache.root)) and not args.dry_run:
        print(f"refusing to prune {cache.root}: {reason}, so entries that jobs on other hosts "
              f"use could go", file=sys.stderr)
        return 1
    victims, kept = cache.prune(args.older_than, args.max_size, args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for entry in victims:
        print(f"{verb} {entry.key[:12]}  {entry.stage:<17} {human_bytes(entry.size):>10}  "
              f"unused for {human_age(time.time() - entry.used)}")
    print(f"{verb} {len(victims)} entries ({human_bytes(sum(e.size for e in victims))}); "
          f"kept {kept} in use by running jobs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
