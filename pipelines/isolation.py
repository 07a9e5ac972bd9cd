"""Each computing stage runs in a process of its own, forked from a clean server.

Why: a stage's peak memory is then its own (no earlier stage's leftovers in the resident set),
everything it allocated is returned when it ends, and a library that crashes the process
(a segfault, the kernel's OOM killer) fails that stage with a message instead of the whole sweep.

Why a fork server and not a plain fork of the job: GNU OpenMP is not fork-safe, a child forked
from a process that already ran a multi-threaded torch op hangs on its first parallel op. The
server (pipelines/stage_server.py) imports the libraries once and never computes, so forks are
cheap and safe. It is the host's, shared by every job that uses it (a sweep's, overlapping runs,
test workers) and gone when the last has ended. A single run leases it at once (run.py, before
Hydra composes: torch imports meanwhile) and asks for its format's libraries
(stages.formats.LIBRARIES: ExecuTorch or onnxruntime, and PREPARED work) when it knows the
format; a sweep's job leases it at its first cache miss, so a run of hits starts none, and the
sweep's process keeps it between jobs (JobLeases). A stage that names its slow libraries
(@stage libraries) is forked once the server has them.
A child gets the caller's environment, working directory, sys.path, log file and terminal with
each call: the server was started earlier and may have older ones. A patch applied to a module
in the caller (a test's monkeypatch) does not reach the child: run such a job with
`isolate_stages=false`.
"""
from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import signal
import socket
import sys
from multiprocessing import forkserver, popen_forkserver, process, reduction, resource_tracker, util
from multiprocessing.context import ForkServerProcess
from itertools import chain
from typing import Any, Callable, Iterable

from hydra.experimental.callback import Callback

from . import logs, memory, stage_server
from .errors import PipelineError

# what every format's stages use, in the order a cell's first stages need it: torch (loading a
# checkpoint), the project, then torch.export's tracing and serialization (wrap)
BASE = ["torch", "stages", "pipelines.runner", "stages.support.model_builder", "stages.support.testcases",
        "torch.export._trace", "torch._functorch.aot_autograd", "torch._export.serde.serialize",
        "torch.export.pt2_archive._package", "networkx", "sympy.combinatorics", "sympy.tensor.tensor",
        "stages.support.export_errors", "stages.support.state_io", "torch._inductor.codecache"]
_lease: stage_server.Lease | None = None  # this process's use of the host's server
_relay: tuple[socket.socket, socket.socket] | None = None  # a sweep's process: where its jobs send their leases


def start(formats: Iterable[str] = ()) -> None:
    """Lease the host's stage server (started if there is none) and have it import torch and
    the libraries of `formats` (stages.formats.preloads). Never waits: the server imports while
    the caller goes on."""
    global _lease
    from stages.formats import preloads

    wanted = [*BASE, *chain(*(preloads(name) for name in formats))]
    if _lease is None:
        with logs.libraries_to_log():
            _lease = stage_server.lease(wanted)
        if _relay is not None:  # a copy of the lease for the sweep's process (JobLeases)
            with contextlib.suppress(OSError):
                socket.send_fds(_relay[1], [b"lease"], [_lease.connection.fileno()])
    else:
        _lease.preload(wanted)


class JobLeases(Callback):
    """A sweep whose jobs are forked from its process (hydra/launcher=local) keeps the server
    its jobs lease until the sweep ends: a job sends a copy of its lease to this process when
    it leases, and the copy stays in flight, unread, until this process ends (the kernel holds
    a descriptor in flight). Without it, when every running job ended at once the server left,
    and the next jobs started another: torch and the formats' libraries again, 4 s of a 17 s
    sweep. A warm sweep, whose jobs lease nothing, still starts none."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        global _relay
        if _relay is None:
            _relay = socket.socketpair()
            _relay[1].setblocking(False)  # a job never waits on it; a copy not sent is not held


def wanted_early(arguments: list[str]) -> bool:
    """Whether `python run.py <arguments>` is a single run that computes in stage processes:
    not a sweep (-m), --help, --cfg, or isolate_stages=false. Only when to start the server
    depends on it, never what runs."""
    flags = {"-m", "--multirun", "--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "--shell-completion"}
    return not flags & set(arguments) and "isolate_stages=false" not in arguments


def preload(formats: Iterable[str]) -> None:
    """Have the server this process leases import the libraries of `formats` now (none leased:
    nothing; the first cache miss leases one)."""
    if _lease is not None:
        start(formats)


def _connect(fds: list[int], after: list[str]) -> tuple[int, int]:
    """multiprocessing's ForkServer.connect_to_new_process (3.11), to the host's server, for a
    child forked once the server has imported `after`."""
    resource_tracker.ensure_running()
    parent_r, child_w = os.pipe()
    child_r, parent_w = os.pipe()
    alive = os.open(os.devnull, os.O_RDONLY)  # the child's: only a server of its own reads it
    try:
        stage_server.fork_request(_lease.address, [child_r, child_w, alive, resource_tracker.getfd(), *fds], after)
        return parent_r, parent_w
    except BaseException:
        os.close(parent_r)
        os.close(parent_w)
        raise
    finally:
        for fd in (child_r, child_w, alive):
            os.close(fd)


class _Popen(popen_forkserver.Popen):
    """multiprocessing's forkserver Popen, without the "preparation" a spawned interpreter
    needs: re-importing the caller's __main__ (run.py, Hydra) costs every stage time, and the
    caller's start method may not exist in the child (a joblib worker's is "loky": "cannot find
    context for 'loky'"). The child needs nothing of it: `call` passes what it does need."""

    def _launch(self, process_obj):  # popen_forkserver.Popen._launch (3.11) with that one change
        prep_data = {"name": process_obj.name, "authkey": process.current_process().authkey}
        buf = io.BytesIO()
        popen_forkserver.set_spawning_popen(self)
        try:
            reduction.dump(prep_data, buf)
            reduction.dump(process_obj, buf)
        finally:
            popen_forkserver.set_spawning_popen(None)
        self.sentinel, w = _connect(self._fds, process_obj.after)
        _parent_w = os.dup(w)
        self.finalizer = util.Finalize(self, util.close_fds, (_parent_w, self.sentinel))
        with open(w, "wb", closefd=True) as f:
            f.write(buf.getbuffer())
        self.pid = forkserver.read_signed(self.sentinel)


class _StageProcess(ForkServerProcess):
    after: list[str] = []  # modules the server imports before it forks this one

    @staticmethod
    def _Popen(process_obj):
        return _Popen(process_obj)


class _Descriptor:
    """A file descriptor the child receives as its own copy (multiprocessing passes it)."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        return _received, (reduction.DupFd(self.fd),)


def _received(duplicate) -> int:
    return duplicate.detach()


def _console_fd() -> int | None:
    try:
        return logs.console().fileno()
    except (AttributeError, OSError, ValueError):  # a captured stream without a descriptor
        return None


def call(stage: str, fn: Callable[..., Any], *args: Any, after: Iterable[str] = ()) -> tuple[Any, float | None]:
    """fn(*args) in a child process: its return value (or its PipelineError, raised here) and
    the child's peak resident memory in MiB. The child is forked once the server has imported
    `after` (the stage's slow libraries: waiting for the server's import beats importing them
    again in the child, with the cycle collector on)."""
    global _lease
    if _lease is None:
        start()
    receive, send = multiprocessing.Pipe(duplex=False)
    console = _console_fd()
    caller = (dict(os.environ), os.getcwd(), list(sys.path), logs.current_file(),
              None if console is None else _Descriptor(console))

    def launch() -> _StageProcess:
        process = _StageProcess(target=_child, args=(send, caller, fn, args), name=f"stage-{stage}")
        process.after = list(after)
        process.start()
        return process

    try:
        child = launch()
    except OSError:  # the server is gone (killed): the host's next one
        requested, _lease = _lease.requested, None
        start()
        _lease.preload(requested)
        child = launch()
    send.close()
    try:
        outcome, value, peak = receive.recv()
    except EOFError:  # it ended without an answer: killed, or crashed in a library
        child.join()
        raise PipelineError(_death(child.exitcode), stage=stage, transient=True,
                            fix="if it ran out of memory, run fewer jobs at once "
                                "(hydra.launcher.n_jobs=1) or give the job more memory") from None
    except BaseException:  # Ctrl-C or an error here: the child must not outlive the call
        child.kill()
        child.join()
        raise
    finally:
        receive.close()
    # it answered and ends now: no wait for its exit code, which the server sends between imports
    if outcome == "error":
        raise value
    return value, peak


def _child(send, caller: tuple, fn: Callable[..., Any], args) -> None:
    environment, cwd, path, log_file, console = caller
    os.environ.clear()
    os.environ.update(environment)
    os.chdir(cwd)
    sys.path[:] = path
    if console is not None:
        logs.use_console(console)
    if log_file is not None:  # the job's log: the libraries' output and tracebacks go there too
        logs.setup(log_file)
    memory.reset_peak()
    try:
        answer = ("ok", fn(*args))
    except PipelineError as exc:
        answer = ("error", exc)
    send.send((*answer, memory.peak_mb()))
    send.close()


def _death(code: int | None) -> str:
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        cause = " (the kernel's OOM killer sends it when memory runs out)" if name == "SIGKILL" else ""
        return f"the stage's process was killed by {name}{cause}"
    return f"the stage's process ended with exit code {code} before reporting a result"
