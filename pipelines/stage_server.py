"""The host's stage server: one process that imports torch and the formats' libraries once and
forks every stage process from that clean state (pipelines/isolation.py says why a fork server).

One per host and environment (the Python, this checkout's code, the variables libraries read
when they load), shared by every process that uses it: the jobs of a sweep, single runs that
overlap, test workers. A process *leases* it (one connection it keeps open; the kernel closes it
when the process ends, however it ends); the server leaves when its last lease goes, so nothing
lingers between runs and no later run gets code older than its own.

It imports as it goes, a module at a time, and forks between two imports: a job asks for torch
before Hydra has composed its config and for its format's libraries once it knows the format;
a stage forked before the server has a library imports it itself, unless its request names the
library (`after`): then the server forks it once it has imported it. The server never computes
(its prepared work, `module:function`, starts no thread) and holds no thread of its own when it
forks.

Protocol (a Unix socket under the temporary directory): a connection sends one pickled request,
{"op": "lease"} (kept open), {"op": "preload", "modules": [...]}, {"op": "status"} (answered
with what it has imported), or {"op": "fork"} with the
descriptors multiprocessing's forkserver takes; a fork is answered as that server answers one
(the child's pid, then its exit code, on the descriptor passed for it), so multiprocessing's
Popen reads it unchanged. A Slurm job's server is its own (in the job's process tree, which its
memory limit and scancel reach), never shared.
"""
from __future__ import annotations

import atexit
import contextlib
import gc
import hashlib
import os
import pickle
import select
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from importlib import import_module
from multiprocessing import forkserver, util
from pathlib import Path
from typing import Iterable

from .locks import PosixLock

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ("pipelines", "stages")  # the project's packages a server imports: its code is part of its identity
# variables libraries read once, when they load (thread pools, allocators, kernels): a process
# with other values needs a server of its own
IMPORT_TIME_PREFIXES = ("OMP_", "KMP_", "GOMP_", "MKL_", "OPENBLAS_", "TORCH", "PYTORCH_", "ORT_", "ONNX",
                        "EXECUTORCH", "XNNPACK", "PYTHON", "LD_", "CUDA_VISIBLE_DEVICES")
MAX_REQUEST = 1 << 16
MAX_FDS = 256


@dataclass
class Lease:
    """This process's use of the host's server: the connection that keeps it alive."""

    address: str
    connection: socket.socket
    requested: set[str] = field(default_factory=set)

    def preload(self, modules: Iterable[str]) -> None:
        """Ask the server to import these too (it does between forks; the caller does not wait)."""
        new = [m for m in modules if m not in self.requested]
        if new:
            self.requested.update(new)
            try:
                _send(self.address, {"op": "preload", "modules": new})
            except OSError:  # it has gone: the next fork starts the host's next one, with these
                pass


def lease(preload: Iterable[str]) -> Lease:
    """The host's server for this environment, started if there is none, leased by this process
    (until it ends or closes the lease) and asked to import `preload`."""
    temporary = Path(tempfile.gettempdir())
    if len(str(temporary)) > 48:  # a socket's path has at most 107 bytes
        temporary = Path("/tmp")
    directory = temporary / f"pipeline-stage-servers-{os.getuid()}"
    directory.mkdir(mode=0o700, exist_ok=True)
    private = os.environ.get("SLURM_JOB_ID")
    name = identity() if not private else f"slurm-{private}-{os.getpid()}"
    address, lock = str(directory / f"{name}.sock"), directory / f"{name}.lock"
    preload = list(preload)
    with PosixLock(lock):
        connection = socket.socket(socket.AF_UNIX)
        try:
            connection.connect(address)
        except (FileNotFoundError, ConnectionRefusedError):  # none, or one that died without its exit
            with contextlib.suppress(FileNotFoundError):
                os.unlink(address)
            _start(address, lock, preload, connection, detach=not private)
        else:
            _send(address, {"op": "preload", "modules": preload})
        connection.sendall(_frame({"op": "lease", "pid": os.getpid()}))
    atexit.register(connection.close)  # the kernel would close it too; Python warns when it does
    return Lease(address, connection, set(preload))


def status(address: str) -> dict:
    """What the server at address has imported and has still to: {"pid", "done", "pending"}."""
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(address)
        socket.send_fds(client, [_frame({"op": "status"})], [])
        data = b""
        while chunk := client.recv(1 << 16):
            data += chunk
    return pickle.loads(data)


def fork_request(address: str, fds: list[int], after: Iterable[str] = ()) -> None:
    """Ask the server at address to fork a stage process (multiprocessing's descriptors), once
    it has imported `after` (modules the stage would otherwise import itself, more slowly)."""
    _send(address, {"op": "fork", "after": list(after)}, fds)


def identity() -> str:
    """What a server's children inherit: this host (a temporary directory can be shared), the
    interpreter, this checkout and its code as it is now, and the variables read when libraries
    load."""
    digest = hashlib.sha256()
    for part in (socket.gethostname(), sys.executable, str(ROOT), *util._args_from_interpreter_flags()):
        digest.update(part.encode() + b"\0")
    for name in sorted(os.environ):
        if name.startswith(IMPORT_TIME_PREFIXES):
            digest.update(f"{name}={os.environ[name]}\0".encode())
    for package in PROJECT:
        for path in sorted((ROOT / package).rglob("*.py")):
            digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:20]


def _start(address: str, lock: Path, preload: list[str], connection: socket.socket, detach: bool) -> None:
    """Bind the server's socket, connect `connection` to it (queued: the first lease is there
    before the server is), then start the server on it."""
    listener = socket.socket(socket.AF_UNIX)
    try:
        listener.bind(address)
        os.chmod(address, 0o600)
        listener.listen(128)
        connection.connect(address)
        log = open(Path(address).with_suffix(".log"), "wb")  # the last server's, for this environment
        command = [sys.executable, *util._args_from_interpreter_flags(), "-c",
                   f"from pipelines.stage_server import main; main({listener.fileno()}, {str(lock)!r}, {preload!r})"]
        subprocess.Popen(command, pass_fds=[listener.fileno()], cwd=ROOT, stdin=subprocess.DEVNULL,
                         stdout=log, stderr=log, start_new_session=detach, close_fds=True)
        log.close()
    finally:
        listener.close()


def _frame(request: dict) -> bytes:
    data = pickle.dumps(request)
    return len(data).to_bytes(4, "big") + data


def _send(address: str, request: dict, fds: list[int] = ()) -> None:
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(address)
        socket.send_fds(client, [_frame(request)], list(fds))


# --- the server ---------------------------------------------------------------------------

FIRST = "torch"  # a spare forked before the server has torch would import it again in the stage
SPARES = 2  # the second serves a request that comes while the server is in a long import
FRESHEN_AFTER_S = 0.1  # imports at least this long since the spares' fork make them worth replacing


def main(listener_fd: int, lock: str, preload: list[str]) -> None:
    """Serve on the listening socket until the last lease is gone, importing `preload` (and
    what requests add) a module at a time between requests."""
    gc.disable()  # imports are a fifth faster without collections: what they make lives on anyway
    listener = socket.socket(fileno=listener_fd)
    listener.setblocking(False)  # spares share it: the one that loses a race goes back to waiting
    server = _Server(listener, Path(lock))
    server.want(preload)
    code = 0
    try:
        server.serve()
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.stderr.flush()
        os._exit(code)  # what it imported is not torn down: nobody waits for it


class _Server:
    """Imports, and keeps two *spares*: children forked from it that wait on the listening socket.

    The spare takes the next connection itself, so a fork never waits for the import the server
    is in (torch.export's takes 1.7 s) nor for a fork of a 1 GB process (30 ms): a stage request
    finds the spare already forked and the spare becomes the stage process. Other requests (a
    lease, a preload) it hands to the server over their private channel, with their descriptors;
    the server forks the next spare at once, and fresher ones when an import ends that the
    waiting spares lack. The server, the spares' parent, reaps them and sends each stage's exit
    code to its client, as multiprocessing's forkserver does."""

    def __init__(self, listener: socket.socket, lock: Path):
        self.listener, self.lock = listener, lock
        self.address = listener.getsockname()
        self.pending: deque[str] = deque()
        self.done: set[str] = set()
        self.leases: set[socket.socket] = set()
        self.spares: set[socket.socket] = set()  # the channels of the spares waiting
        self.channels: dict[socket.socket, int] = {}  # every spare's channel that is open, to its pid
        self.children: dict[int, int] = {}  # a stage's pid -> the descriptor its exit code goes to
        self.held: list[tuple[list[str], list[int]]] = []  # stages waiting for imports: (modules, fds)
        self.exited: dict[int, int] = {}  # exit codes of stages whose descriptor has not come yet
        self.leased = False  # a first lease waits in the queue until the first spare takes it
        self.unshared_s = 0.0  # seconds of imports done since the spares waiting were forked
        self.selector = selectors.DefaultSelector()

    def want(self, modules: Iterable[str]) -> None:
        for name in modules:
            if name not in self.done and name not in self.pending:
                self.pending.append(name)

    def serve(self) -> None:
        util._close_stdin()
        self.signal_r, self.signal_w = os.pipe()
        os.set_blocking(self.signal_r, False)
        os.set_blocking(self.signal_w, False)
        self.handlers = {signal.SIGCHLD: signal.signal(signal.SIGCHLD, lambda *_: None),
                         signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN)}
        signal.set_wakeup_fd(self.signal_w)
        self.selector.register(self.signal_r, selectors.EVENT_READ)
        while True:
            self._release_held()
            while len(self.spares) < SPARES and (FIRST in self.done or FIRST not in self.pending):
                self._fork_spare()
            ready = [key.fileobj for key, _ in self.selector.select(0 if self.pending else None)]
            if not ready and self.pending:
                name = self._next()
                started = time.monotonic()
                self._import(name)
                self.unshared_s += time.monotonic() - started
                if self.unshared_s >= FRESHEN_AFTER_S or not self.pending:
                    self._retire_spares()
                continue
            for source in ready:  # channels first: a stage's descriptor before its exit code
                if source in self.channels:
                    self._from_spare(source)
            for source in ready:
                if source == self.signal_r:
                    self._reap()
                elif source in self.leases:
                    self._lease_ended(source)
            if self.leased and not self.leases and self._leave():
                return

    def _next(self) -> str:
        """The next module to import: what a held stage waits for, in the order it named them;
        then imports before prepared work (`module:function`: one stage needs it, every stage
        needs an import), each in the order asked."""
        waited = [m for modules, _ in self.held for m in modules if m in self.pending]
        name = waited[0] if waited else next((m for m in self.pending if ":" not in m), self.pending[0])
        self.pending.remove(name)
        return name

    def _import(self, name: str) -> None:
        """A module, or `module:function` (prepared work whose results the children inherit)."""
        self.done.add(name)
        module, _, function = name.partition(":")
        started = time.monotonic()
        try:
            imported = import_module(module)
            if function:
                getattr(imported, function)()
                gc.collect()  # its garbage, before what it keeps is frozen
        except Exception as exc:  # the stage that needs it imports it and reports
            print(f"stage server {os.getpid()}: preloading {name} failed: {exc!r}", file=sys.stderr, flush=True)
        else:
            gc.freeze()  # a stage's collections (memory.release: several a stage) skip all it inherits
            print(f"stage server {os.getpid()}: at {time.time():.3f} {name} in {time.monotonic() - started:.2f} s",
                  file=sys.stderr, flush=True)

    # spares

    def _fork_spare(self, handed: list[int] | None = None) -> None:
        """A spare, or with `handed` (a fork request's descriptors) a stage process at once."""
        mine, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                mine.close()
                code = _Spare(self, theirs).run(handed)
            except Exception:
                sys.excepthook(*sys.exc_info())
                sys.stderr.flush()
            finally:
                os._exit(code)
        theirs.close()
        if handed is None:
            self.spares.add(mine)
        else:
            for fd in handed:
                os.close(fd)
        self.channels[mine] = pid
        self.selector.register(mine, selectors.EVENT_READ)

    def _retire_spares(self) -> None:
        """Tell the waiting spares to leave (one may have taken a request meanwhile: its channel
        stays open until it says so or ends)."""
        for channel in self.spares:
            try:
                channel.sendall(b"x")
            except OSError:
                pass
        self.spares.clear()
        self.unshared_s = 0.0

    def _from_spare(self, channel: socket.socket) -> None:
        """What a spare hands over: a stage it became (its exit code's descriptor), a request
        for the server (with its connection), or its end (EOF)."""
        try:
            data, fds, _, _ = socket.recv_fds(channel, MAX_REQUEST, MAX_FDS)
        except OSError:
            data, fds = b"", []
        if not data:
            self._close_channel(channel)
            return
        message = pickle.loads(data)
        if message["kind"] == "stage":
            pid, (child_w,) = self.channels[channel], fds
            self._close_channel(channel, became_stage=True)
            if pid in self.exited:
                _send_code(child_w, self.exited.pop(pid))
            else:
                self.children[pid] = child_w
        elif message["kind"] == "lease":
            connection = socket.socket(fileno=fds[0])
            connection.setblocking(False)
            self.leases.add(connection)
            self.leased = True
            self.selector.register(connection, selectors.EVENT_READ)
        elif message["kind"] == "fork":  # a stage that waits for modules the spare lacked
            os.close(fds[0])
            self.want(message["after"])
            self.held.append((message["after"], fds[1:]))
        elif message["kind"] == "preload":
            for fd in fds:
                os.close(fd)
            self.want(message["modules"])
        elif message["kind"] == "status":
            with socket.socket(fileno=fds[0]) as connection:
                connection.settimeout(10)
                try:
                    connection.sendall(pickle.dumps({"pid": os.getpid(), "done": sorted(self.done),
                                                     "pending": list(self.pending)}))
                except OSError:
                    pass
            for fd in fds[1:]:
                os.close(fd)

    def _release_held(self) -> None:
        """Fork the held stages whose modules have been imported (or failed to import)."""
        while ready := next((held for held in self.held if all(m in self.done for m in held[0])), None):
            self.held.remove(ready)  # before the fork: the child closes every other held descriptor
            self._fork_spare(handed=ready[1])

    def _close_channel(self, channel: socket.socket, became_stage: bool = False) -> None:
        self.spares.discard(channel)  # it became a stage, or ended: the loop forks the next one
        pid = self.channels.pop(channel, None)
        if not became_stage:
            self.exited.pop(pid, None)
        self.selector.unregister(channel)
        channel.close()

    def _reap(self) -> None:
        os.read(self.signal_r, 65536)
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            child_w = self.children.pop(pid, None)
            if child_w is not None:
                _send_code(child_w, code)
            elif pid in self.channels.values():  # a stage whose descriptor is still on its way
                self.exited[pid] = code

    # leases

    def _lease_ended(self, connection: socket.socket) -> None:
        try:
            if connection.recv(4096):
                return  # a lease says nothing more; ignore what it might
        except BlockingIOError:
            return
        except OSError:
            pass
        self.selector.unregister(connection)
        self.leases.discard(connection)
        connection.close()

    def _leave(self) -> bool:
        """With no lease left: leave, unless a client is joining (it holds the lock while it
        connects, and its connection waits in the listener's queue or in a spare's hands)."""
        locked = PosixLock(self.lock)
        if not locked.acquire(blocking=False):
            return False
        if not self._queued():
            self._retire_spares()
            while self.channels:  # every spare says what it took, or ends
                for key, _ in self.selector.select(1.0):
                    if key.fileobj in self.channels:
                        self._from_spare(key.fileobj)
        if self.leases or self._queued():
            locked.release()
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.address)
        return True  # the lock goes with the process

    def _queued(self) -> bool:
        return bool(select.select([self.listener], [], [], 0)[0])


class _Spare:
    """A child of the server waiting for the next connection, with what the server had imported."""

    def __init__(self, server: _Server, channel: socket.socket):
        self.server, self.channel = server, channel

    def run(self, handed: list[int] | None = None) -> int:
        """Wait for a connection and serve it; with `handed`, become that stage at once."""
        server = self.server
        server.selector.close()
        for lease in server.leases:
            lease.close()
        for other in server.channels:
            other.close()
        for fd in server.children.values():
            os.close(fd)
        for _, fds in server.held:
            for fd in fds:
                os.close(fd)
        if handed is not None:
            return self._become_stage(handed)
        while True:
            ready, _, _ = select.select([server.listener, self.channel], [], [])
            if self.channel in ready:  # retired, or the server has gone
                return 0
            try:
                connection, _ = server.listener.accept()
            except BlockingIOError:  # another spare took it
                continue
            connection.settimeout(10)
            try:
                request, fds = _request(connection)
            except (OSError, EOFError, pickle.UnpicklingError, ValueError):
                connection.close()
                continue
            if request["op"] != "fork" or not all(m in sys.modules for m in request.get("after", ())):
                socket.send_fds(self.channel, [pickle.dumps({"kind": request["op"], **request})],
                                [connection.fileno(), *fds])
                connection.close()
                for fd in fds:
                    os.close(fd)
                continue
            connection.close()
            return self._become_stage(fds)

    def _become_stage(self, fds: list[int]) -> int:
        """Serve the Popen that asked: multiprocessing.forkserver.main's child (3.11), with this
        process as the child it forked."""
        server = self.server
        child_r, child_w, *passed = fds
        try:
            forkserver.write_signed(child_w, os.getpid())
        except BrokenPipeError:  # the client went
            return 1
        socket.send_fds(self.channel, [pickle.dumps({"kind": "stage"})], [child_w])
        server.listener.close()
        self.channel.close()
        gc.enable()  # the server's imports ran without it; a stage computes
        unused = [child_w, server.signal_r, server.signal_w]
        return forkserver._serve_one(child_r, passed, unused, server.handlers)


def _request(connection: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _, _ = socket.recv_fds(connection, MAX_REQUEST, MAX_FDS)
    if len(data) < 4:
        raise EOFError
    size = int.from_bytes(data[:4], "big")
    body = data[4:]
    while len(body) < size:
        more = connection.recv(size - len(body))
        if not more:
            raise EOFError
        body += more
    return pickle.loads(body), fds


def _send_code(child_w: int, code: int) -> None:
    try:
        forkserver.write_signed(child_w, code)
    except BrokenPipeError:  # its client went
        pass
    os.close(child_w)
