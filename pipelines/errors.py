"""Errors a user can act on: what went wrong, where, and how to fix it."""
from __future__ import annotations


class PipelineError(Exception):
    """An input or configuration problem the user can fix.

    The runner prints it as one short block (stage, problem, fix) with no traceback,
    exits non-zero, and stores no entry for the failing stage: the cache records the failure
    under the stage's key instead (unless it is transient), so an unchanged re-run reports it
    at once (Cache.failure).
    """

    def __init__(self, message: str, *, fix: str = "", stage: str | None = None,
                 module: str | None = None, transient: bool = False):
        super().__init__(message)
        self.message = message
        self.fix = fix
        self.stage = stage
        self.module = module  # the model's module it broke on, when known (blocks.0.norm)
        self.transient = transient  # the machine's doing (memory, disk), not the stage's inputs

    def __reduce__(self):  # crosses from a stage's process (pipelines/isolation.py) whole
        return _rebuild, (type(self), self.args, dict(self.__dict__), _portable_cause(self))

    def __str__(self) -> str:
        where = f"[{self.stage}] " if self.stage else ""
        text = f"{where}{self.message}"
        return f"{text}\n  fix: {self.fix}" if self.fix else text


def _rebuild(cls: type[PipelineError], args: tuple, state: dict, cause: Exception | None) -> PipelineError:
    """Without calling __init__ (subclasses take other arguments: KeysDoNotFit), with a stand-in
    for what caused it (the cache tells a full disk by an OSError's errno or a library failure)."""
    error = cls.__new__(cls, *args)
    error.args = args
    error.__dict__.update(state)
    error.__cause__ = cause
    return error


def _portable_cause(exc: BaseException) -> Exception | None:
    """A picklable stand-in for the chain below exc: its OSError with the errno, else the
    library's failure as a RuntimeError (a library's own exception may not pickle)."""
    chain, seen = [], exc.__cause__ or exc.__context__
    while seen is not None and len(chain) < 20:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for error in chain:
        if isinstance(error, OSError) and error.errno is not None:
            return OSError(error.errno, error.strerror)
    return RuntimeError(first_line(chain[0])) if chain else None


class VerificationFailed(PipelineError):
    """The artifact ran but does not match PyTorch within the configured tolerance."""


def root_cause(exc: BaseException, limit: int = 300) -> str:
    """`Type: first line` of the innermost exception a chain wraps (Hydra's "Error in call to
    target ..." hides the TypeError that says what went wrong)."""
    while exc.__cause__ is not None and exc.__cause__ is not exc:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {first_line(exc, limit)}"


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's text: enough to name what failed."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0].strip()[:limit] if lines else type(exc).__name__
