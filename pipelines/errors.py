"""Errors a user can act on: what went wrong, where, and how to fix it."""
from __future__ import annotations


class PipelineError(Exception):
    """An input or configuration problem the user can fix.

    The runner prints it as one short block (stage, problem, fix) with no traceback,
    exits non-zero, and stores nothing in the cache for the failing stage.
    """

    def __init__(self, message: str, *, fix: str = "", stage: str | None = None,
                 module: str | None = None):
        super().__init__(message)
        self.message = message
        self.fix = fix
        self.stage = stage
        self.module = module  # the model's module it broke on, when known (blocks.0.norm)

    def __str__(self) -> str:
        where = f"[{self.stage}] " if self.stage else ""
        text = f"{where}{self.message}"
        return f"{text}\n  fix: {self.fix}" if self.fix else text


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
