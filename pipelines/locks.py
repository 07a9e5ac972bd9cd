"""File locks for a cache shared by processes on several hosts, possibly over NFS.

What `filelock` guarantees (4.2.11, installed): `FileLock` is `UnixFileLock`, a non-blocking
`fcntl.flock(LOCK_EX | LOCK_NB)` retried every 50 ms; only if flock answers ENOSYS does it fall
back, with a warning, to `SoftFileLock`, a lock file's existence. Its `SoftFileLease` (expiring
claims kept alive by a heartbeat) "trades mutual exclusion for progress", in its own words.
flock over NFS, from flock(2) and nfs(5): up to Linux 2.6.11 flock never left the client; since
2.6.12 the client emulates it as a POSIX byte-range lock over the whole file, sent to the server
(NLM on NFSv3, LOCK on NFSv4), so it does exclude across hosts, but with POSIX semantics. With
`nolock`, `local_lock=all` or `local_lock=flock` (2.6.37+) it excludes only processes of one host.

So this module takes POSIX locks (`fcntl.lockf`) itself: what NFS carries natively, the same
semantics on a local disk as on NFS, and shared locks for the prune lock. Two POSIX rules to
design for: a lock belongs to the process (its threads are not excluded from one another), and
closing any descriptor of the file drops all the process's locks on it; so a lock file is only
opened here, one lock object per file at a time.

After a crash: the kernel drops a dead process's locks. If a host dies, NFSv4 drops its locks
when its lease runs out (90 s by default); NFSv3 only when statd learns that the host rebooted,
so a host that never returns can hold a lock until an admin clears it (waiters wait: slow, not
wrong). A host cut off for longer than its lease can lose a lock another host then takes; its
next I/O on that file fails with EIO (`nfs.recover_lost_locks=0`, the default). A waiter on
NFSv4.0 polls for the lock, so it may start up to ~30 s after the release.

Nothing in the cache relies on a lock for correctness: entries are built privately, renamed into
place, and verified when read. The key lock saves computing a stage twice; the prune lock and the
pins keep `prune` from removing what a running job uses, which also needs the pins other hosts
write to be visible: NFS close-to-open consistency (the default `cto`: open and opendir revalidate
with the server) gives that. prune therefore refuses where either is missing (`cross_host_unsafe`).
A lease lock would add timeouts and heartbeats and still not exclude; it is not needed where
POSIX locks reach the server, and it cannot help where they do not.
"""
from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

_CONTENDED = (errno.EAGAIN, errno.EACCES)


class PosixLock:
    """An exclusive (or shared) POSIX lock on one file, for this process; a context manager."""

    def __init__(self, path: Path, shared: bool = False):
        self.path = Path(path)
        self.shared = shared
        self.fd: int | None = None

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock, waiting for it unless blocking is False; whether it was taken."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        mode = (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB)
        try:
            fcntl.lockf(fd, mode)
        except BaseException as exc:
            os.close(fd)
            if isinstance(exc, OSError) and exc.errno in _CONTENDED:
                return False
            raise
        self.fd = fd
        return True

    def release(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> PosixLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def cross_host_unsafe(path: Path, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """Why other hosts may not see this host's locks or files under path (an NFS mount with
    `nolock`, `local_lock=posix|all` or `nocto`), or None."""
    path = os.path.realpath(path)
    best = ("", "", "")
    try:
        lines = Path(mountinfo).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        point = fields[4].replace("\\040", " ")
        tail = fields[fields.index("-") + 1:]
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[0]):
            best = (point, tail[0], f"{fields[5]},{tail[2] if len(tail) > 2 else ''}")
    point, fstype, options = best
    unsafe = set(options.split(",")) & {"nolock", "local_lock=posix", "local_lock=all", "nocto"}
    if fstype.startswith("nfs") and unsafe:
        return f"{point} is an {fstype} mount with {min(unsafe)}"
    return None
