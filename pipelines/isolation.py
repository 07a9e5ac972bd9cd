"""Each computing stage runs in a process of its own, forked from a clean server.

Why: a stage's peak memory is then its own (no earlier stage's leftovers in the resident set),
everything it allocated is returned when it ends, and a library that crashes the process
(a segfault, the kernel's OOM killer) fails that stage with a message instead of the whole sweep.

Why a fork server (multiprocessing's "forkserver") and not a plain fork of the job: GNU OpenMP
is not fork-safe, a child forked from a process that already ran a multi-threaded torch op
hangs on its first parallel op. The server preloads the libraries once (torch and what the job's
format imports, stages.formats.LIBRARIES: ExecuTorch or onnxruntime, shared by every child) and
never computes, so forks are cheap and safe. A job's first stage that computes starts it (a run
of cache hits starts none), with the libraries of every format its sweep has (SweepFormats);
a later job of the same process that needs more restarts it with the union.
A child gets the caller's environment, working directory, sys.path, log file and terminal with
each call: the server was started earlier and may have older ones. A patch applied to a module in the caller (a test's
monkeypatch) does not reach the child: run such a job with `isolate_stages=false`.
"""
from __future__ import annotations

import io
import multiprocessing
import os
import signal
import sys
from multiprocessing import forkserver, popen_forkserver, process, reduction, util
from multiprocessing.context import ForkServerProcess
from itertools import chain
from typing import Any, Callable, Iterable

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from . import logs, memory
from .errors import PipelineError

BASE = ["torch", "torch._dynamo", "torch.export", "torch._inductor"]  # what every format traces with (2 s)
SWEEP_FORMATS = "PIPELINE_SWEEP_FORMATS"  # set by SweepFormats for the jobs of a sweep
_preloaded: frozenset[str] | None = None  # the libraries the running server imported


class SweepFormats(Callback):
    """Tells a sweep's jobs every format it sweeps, so a worker going from .onnx cells to .pte
    ones starts one server with both instead of restarting it (measured: ~4 s a restart, three
    in the six-cell demo sweep)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        swept = [str(v) for v in (config.hydra.sweeper.get("params") or {}).get("format", "").split(",")]
        for override in config.hydra.overrides.task:
            key, _, value = override.partition("=")
            if key.lstrip("+~") == "format":
                swept += value.split(",")
        chosen = getattr(config.format.name, "value", config.format.name)  # the Format enum's name
        formats = sorted({chosen, *(f.strip() for f in swept if f.strip())})
        os.environ[SWEEP_FORMATS] = ",".join(formats)


def start(formats: Iterable[str] | None = None) -> None:
    """Start the fork server preloading torch, the project and the libraries of `formats` (None:
    every format), unless the running one already has them. The libraries' import-time prints go
    to the run's log (children write the console through the descriptor each call passes)."""
    global _preloaded
    from stages.formats import LIBRARIES

    names = LIBRARIES if formats is None else [*formats, *os.environ.get(SWEEP_FORMATS, "").split(",")]
    wanted = frozenset(chain(*(LIBRARIES.get(name, ()) for name in names)))
    if _preloaded is not None:
        if wanted <= _preloaded:
            return
        forkserver._forkserver._stop()  # multiprocessing's one way to change a server's preload
        wanted |= _preloaded
    forkserver.set_forkserver_preload([*BASE, *sorted(wanted), "stages", "pipelines.runner", "pipelines.fork_server"])
    with logs.libraries_to_log():
        forkserver.ensure_running()
    _preloaded = wanted


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
        self.sentinel, w = forkserver.connect_to_new_process(self._fds)
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
