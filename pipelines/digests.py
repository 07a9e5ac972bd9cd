"""sha256 of files remembered by what stat says about them, as git's index and DVC's state do:
(device, inode, size, mtime) -> digest, one small file each under <cache>/digests/. A warm run
then hashes no checkpoint and no artifact it has hashed before, whatever its size.

A file written within the last two seconds is hashed every time and not remembered (it could be
rewritten within the same timestamp tick without its stat changing); `cache.verify=full`
bypasses the memory. A hard link shares its inode, size and mtime, so an artifact linked out of
the cache is known by the digest its entry recorded when it was sealed.
"""
from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

from .versions import sha256_file

SETTLED_NS = 2 * 10**9


def link_or_copy(src: Path, dst: Path) -> None:
    """A file passed on (into a run's artifacts, to the next stage) without duplicating its bytes
    where the filesystem allows a hard link; a `dst` already there (a sweep run again into its
    directory) is replaced, never half-written."""
    dst = Path(dst)
    if dst.exists() and os.path.samefile(src, dst):
        return  # its link already (a rename onto it would leave the new link behind)
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex}.tmp")
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


class Digests:
    def __init__(self, root: Path, trust_stat: bool = True):
        self.dir = Path(root) / "digests"
        self.trust_stat = trust_stat

    def sha256(self, path: Path) -> str:
        stat = os.stat(path)
        memo = self.dir / _key(stat)
        if self.trust_stat:
            try:
                return memo.read_text()
            except OSError:
                pass
        digest = sha256_file(Path(path))
        if stat.st_mtime_ns < time.time_ns() - SETTLED_NS and os.stat(path).st_mtime_ns == stat.st_mtime_ns:
            self.remember(stat, digest)
        return digest

    def remember(self, stat: os.stat_result, digest: str) -> None:
        """Record a digest computed elsewhere (a cache entry's files, when it is sealed)."""
        if stat.st_mtime_ns >= time.time_ns() - SETTLED_NS:
            return  # too fresh to trust its stat
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = self.dir / f".{uuid.uuid4().hex}"
            tmp.write_text(digest)
            os.replace(tmp, self.dir / _key(stat))
        except OSError:  # a read-only or full cache: hash again next time
            pass


def _key(stat: os.stat_result) -> str:
    return f"{stat.st_dev}-{stat.st_ino}-{stat.st_size}-{stat.st_mtime_ns}"


def sha256(path: Path, digests: Digests | None) -> str:
    """The file's sha256, from `digests` when there is one."""
    return digests.sha256(path) if digests else sha256_file(Path(path))
