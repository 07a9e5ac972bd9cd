"""Each computing stage runs in a process of its own, forked from a clean server.

Why: a stage's peak memory is then its own (no earlier stage's leftovers in the resident set),
everything it allocated is returned when it ends, and a library that crashes the process
(a segfault, the kernel's OOM killer) fails that stage with a message instead of the whole sweep.

Why a fork server (multiprocessing's "forkserver") and not a plain fork of the job: GNU OpenMP
is not fork-safe, a child forked from a process that already ran a multi-threaded torch op
hangs on its first parallel op. The server preloads the libraries once (torch and what the job's
format imports, stages.formats.LIBRARIES: ExecuTorch or onnxruntime, shared by every child) and
never computes, so forks are cheap and safe. A job's first stage that computes starts it (a run
of cache hits starts none); the jobs of a sweep share one per host, with the libraries of every
format the sweep has (SweepServer); a later job that needs more restarts it with the union.
A child gets the caller's environment, working directory, sys.path, log file and terminal with
each call: the server was started earlier and may have older ones. A patch applied to a module in the caller (a test's
monkeypatch) does not reach the child: run such a job with `isolate_stages=false`.
"""
from __future__ import annotations

import io
import json
import multiprocessing
import os
import signal
import socket
import sys
from multiprocessing import forkserver, popen_forkserver, process, reduction, resource_tracker, util
from multiprocessing.context import ForkServerProcess
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Iterable

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from . import logs, memory
from .errors import PipelineError

BASE = ["torch", "torch._dynamo", "torch.export", "torch._inductor"]  # what every format traces with (2 s)
SWEEP_FORMATS = "PIPELINE_SWEEP_FORMATS"  # set by SweepServer for the jobs of a sweep: the formats
SWEEP_DIR = "PIPELINE_SWEEP_DIR"  # and where they publish the server they share, one per host
_preloaded: frozenset[str] | None = None  # the libraries of the server this process uses
_shared: dict[str, Any] | None = None  # that server when another job of the sweep started it


class SweepServer(Callback):
    """Lets a sweep's jobs share one stage server per host: it preloads every format the sweep
    has (no restart going from .onnx cells to .pte ones: ~4 s each, three in the six-cell demo
    sweep), and the first job that computes starts it (a warm sweep starts none) and publishes
    its address in the sweep directory for the others. It lives as long as the job process that
    started it (a sweep worker: to the sweep's end); a job that finds it gone starts another."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        swept = [str(v) for v in (config.hydra.sweeper.get("params") or {}).get("format", "").split(",")]
        for override in config.hydra.overrides.task:
            key, _, value = override.partition("=")
            if key.lstrip("+~") == "format":
                swept += value.split(",")
        chosen = getattr(config.format.name, "value", config.format.name)  # the Format enum's name
        os.environ[SWEEP_FORMATS] = ",".join(sorted({chosen, *(f.strip() for f in swept if f.strip())}))
        Path(config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)
        os.environ[SWEEP_DIR] = str(Path(config.hydra.sweep.dir).resolve())


def start(formats: Iterable[str] | None = None) -> None:
    """Make sure this process has a fork server preloading torch, the project and the libraries
    of `formats` (None: every format): the running one when it has them, else its sweep's when
    that has them, else a new one (published for the sweep). Non-blocking: the server imports
    while the caller goes on; the first fork waits for it. The libraries' import-time prints go
    to the run's log (children write the console through the descriptor each call passes)."""
    global _preloaded, _shared
    from stages.formats import LIBRARIES

    names = LIBRARIES if formats is None else [*formats, *os.environ.get(SWEEP_FORMATS, "").split(",")]
    wanted = frozenset(chain(*(LIBRARIES.get(name, ()) for name in names)))
    if _preloaded is not None and wanted <= _preloaded:
        return
    wanted |= _preloaded or frozenset()
    # a Slurm job's stages stay in its own process tree: its memory limit and scancel reach them
    sweep = None if "SLURM_JOB_ID" in os.environ else os.environ.get(SWEEP_DIR)
    if not sweep:
        _own(wanted)
        return
    from .locks import PosixLock

    host = socket.gethostname()
    with PosixLock(Path(sweep) / f".stage-server-{host}.lock"):
        published = _published(Path(sweep) / f".stage-server-{host}.json")
        if published and wanted <= frozenset(published["preload"]):
            _shared, _preloaded = (None if published["pid"] == os.getpid() else published), frozenset(published["preload"])
            return
        _own(wanted | frozenset(published["preload"] if published else ()))
        _write_json(Path(sweep) / f".stage-server-{host}.json",
                    {"pid": os.getpid(), "address": forkserver._forkserver._forkserver_address,
                     "preload": sorted(_preloaded)})


def _own(wanted: frozenset[str]) -> None:
    """Start this process's own server with `wanted` (stopping one it had)."""
    global _preloaded, _shared
    if forkserver._forkserver._forkserver_pid is not None:
        forkserver._forkserver._stop()  # multiprocessing's one way to change a server's preload
    forkserver.set_forkserver_preload([*BASE, *sorted(wanted), "stages", "pipelines.runner", "pipelines.fork_server"])
    with logs.libraries_to_log():
        forkserver.ensure_running()
    _preloaded, _shared = wanted, None


def _published(path: Path) -> dict[str, Any] | None:
    """The server a job of this sweep published on this host, while its owner lives."""
    try:
        found = json.loads(path.read_text())
        os.kill(found["pid"], 0)
    except (OSError, ValueError, KeyError):
        return None
    return found if os.path.exists(found["address"]) else None


def _write_json(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def _connect(fds: list[int]) -> tuple[int, int]:
    """multiprocessing's ForkServer.connect_to_new_process (3.11), to the sweep's shared server
    (its own singleton only knows a server this process started)."""
    resource_tracker.ensure_running()
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(_shared["address"])
        parent_r, child_w = os.pipe()
        child_r, parent_w = os.pipe()
        alive = os.open(os.devnull, os.O_RDONLY)  # the child's: only a server of its own reads it
        try:
            reduction.sendfds(client, [child_r, child_w, alive, resource_tracker.getfd(), *fds])
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
        self.sentinel, w = _connect(self._fds) if _shared else forkserver.connect_to_new_process(self._fds)
        _parent_w = os.dup(w)
        self.finalizer = util.Finalize(self, util.close_fds, (_parent_w, self.sentinel))
        with open(w, "wb", closefd=True) as f:
            f.write(buf.getbuffer())
        self.pid = forkserver.read_signed(self.sentinel)


class _StageProcess(ForkServerProcess):
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


def call(stage: str, fn: Callable[..., Any], *args: Any) -> tuple[Any, float | None]:
    """fn(*args) in a child process: its return value (or its PipelineError, raised here) and
    the child's peak resident memory in MiB."""
    if _preloaded is None:
        start()
    receive, send = multiprocessing.Pipe(duplex=False)
    console = _console_fd()
    caller = (dict(os.environ), os.getcwd(), list(sys.path), logs.current_file(),
              None if console is None else _Descriptor(console))
    child = _StageProcess(target=_child, args=(send, caller, fn, args), name=f"stage-{stage}")
    try:
        child.start()
    except OSError:  # the sweep's server went with the job that started it: one of our own
        if not _shared:
            raise
        _own(_preloaded)
        child = _StageProcess(target=_child, args=(send, caller, fn, args), name=f"stage-{stage}")
        child.start()
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
    child.join()
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
