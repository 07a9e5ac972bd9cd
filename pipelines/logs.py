"""The console shows the run; everything the libraries print goes to the run's log file."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Iterable, Iterator, TextIO, TypeVar

LOGGER_NAME = "pipeline"
T = TypeVar("T")

_console: TextIO | None = None
_log_fd: int | None = None
_file_handler: logging.StreamHandler | None = None
_log_file: Path | None = None


def console() -> TextIO:
    """The terminal as it was before any redirection."""
    return _console or sys.stdout


def use_console(fd: int) -> None:
    """The terminal is this file descriptor (a stage's own process gets its job's terminal)."""
    global _console
    _console = os.fdopen(fd, "w", buffering=1)


def setup(log_file: Path) -> logging.Logger:
    """Console handler for the pipeline's own messages; everything else to log_file."""
    global _console, _log_fd, _file_handler, _log_file
    if _console is None:
        _console = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    if _log_fd is not None:
        os.close(_log_fd)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    _log_fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    _log_file = log_file

    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        if handler is _file_handler:  # a sweep worker's previous job's log: its file is closed
            handler.stream.close()
    _file_handler = logging.StreamHandler(os.fdopen(os.dup(_log_fd), "a", buffering=1))
    _file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(_file_handler)
    root.setLevel(logging.INFO)

    ours = logging.getLogger(LOGGER_NAME)
    for handler in list(ours.handlers):
        ours.removeHandler(handler)
    screen = logging.StreamHandler(_console)
    screen.setFormatter(logging.Formatter("%(message)s"))
    screen.setLevel(logging.INFO)
    ours.addHandler(screen)
    ours.setLevel(logging.INFO)
    logging.captureWarnings(True)
    warnings.simplefilter("default")
    return ours


def current_file() -> Path | None:
    """The log file setup() opened last (a stage's own process opens the same one)."""
    return _log_file


@contextlib.contextmanager
def libraries_to_log() -> Iterator[None]:
    """Send fd 1 and 2 (Python and C++ prints, warnings) to the run log while the block runs."""
    if _log_fd is None:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    os.dup2(_log_fd, 1)
    os.dup2(_log_fd, 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def progress(items: Iterable[T], total: int, label: str, every_s: float = 2.0) -> Iterator[T]:
    """Yield items, printing `label i/total` to the console at most every `every_s` seconds."""
    log = logging.getLogger(LOGGER_NAME)
    last = time.monotonic()
    for index, item in enumerate(items, 1):
        yield item
        now = time.monotonic()
        if now - last >= every_s and index < total:
            log.info("    %s %d/%d", label, index, total)
            last = now
