"""Content-addressed stage cache.

An entry lives in `<root>/<k[:2]>/<k>/`: the stage's files under `files/` and an `entry.json`
(what went into the key, each file's sha256, the stage's result, seconds taken). Entries are
built in a private temporary directory and renamed into place, so a crash never leaves a half
entry that looks whole; an entry whose files are missing or altered is never used.
One lock per key: parallel sweep jobs compute a shared stage once, the others wait and reuse it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from .versions import sha256_file

ENTRY_FILE = "entry.json"


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def compute_key(material: dict[str, Any]) -> str:
    """sha256 over the canonical JSON of everything that determines a stage's output."""
    return hashlib.sha256(canonical_json(material).encode()).hexdigest()


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file below root, by relative POSIX path."""
    return {p.relative_to(root).as_posix(): sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file()}


@dataclass(frozen=True)
class Entry:
    key: str
    files: Path  # directory holding the stage's output files
    meta: dict[str, Any]

    @property
    def result(self) -> dict[str, Any]:
        return self.meta["result"]


class Cache:
    """The store of stage entries under one root directory."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_orphaned_temporaries()

    def entry_dir(self, key: str) -> Path:
        return self.root / key[:2] / key

    def lock(self, key: str) -> FileLock:
        locks = self.root / "locks"
        locks.mkdir(exist_ok=True)
        return FileLock(str(locks / f"{key}.lock"))

    def lookup(self, key: str) -> Entry | None:
        """The entry for key if it is whole and unaltered, else None."""
        directory = self.entry_dir(key)
        try:
            meta = json.loads((directory / ENTRY_FILE).read_text())
        except (OSError, ValueError):
            return None
        files = directory / "files"
        if not files.is_dir() or meta.get("key") != key:
            return None
        if hash_tree(files) != meta.get("files"):
            return None
        return Entry(key, files, meta)

    def new_workdir(self) -> Path:
        """A private temporary directory in which a stage builds its entry."""
        tmp = self.root / "tmp" / f"{os.getpid()}-{uuid.uuid4().hex}"
        (tmp / "files").mkdir(parents=True)
        return tmp

    def commit(self, key: str, workdir: Path, meta: dict[str, Any]) -> Entry:
        """Seal workdir as the entry for key (caller holds the key's lock)."""
        meta = {**meta, "key": key, "files": hash_tree(workdir / "files")}
        (workdir / ENTRY_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
        final = self.entry_dir(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # a stale or damaged entry: move it aside before replacing it
            stale = final.with_name(f"{key}.stale-{uuid.uuid4().hex}")
            os.rename(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.rename(workdir, final)
        return Entry(key, final / "files", meta)

    def _remove_orphaned_temporaries(self) -> None:
        tmp = self.root / "tmp"
        if not tmp.is_dir():
            return
        for path in tmp.iterdir():
            pid = path.name.split("-", 1)[0]
            if pid.isdigit() and not _process_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
