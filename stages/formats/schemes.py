"""Precisions as components: each format registers the schemes it builds, one per precision.

A scheme (`@scheme("onnx", "int8", calibrated=True)`) turns convert's fp32 program into the
precision's, in the format's own IR and tools, and declares what it reads: calibration data, and
the dataclass of its own knobs under `precision.options` (int4's group size). The quantize stage
runs the one the config names; `check` refuses, before any stage runs, a precision a format does
not register and an option its scheme does not read.

Adding a precision is one conf/precision/<name>.yaml and one scheme in each format's
stages/formats/<format>_precisions.py. Those modules import their libraries inside the
functions: the check runs in the main process, which never imports torch.
"""
from __future__ import annotations

import importlib
import typing
from dataclasses import dataclass
from typing import Any, Callable

from pipelines.errors import PipelineError

from . import Job

FORMATS = ("onnx", "pte")


@dataclass(frozen=True)
class Scheme:
    fmt: str
    precision: str
    apply: Callable[[Job], str]  # writes the program into job.workdir; returns how it was made
    calibrated: bool  # reads calibrate's data
    options: type | None  # the dataclass of the `precision.options` it reads

    @property
    def where(self) -> str:
        return f"stages/formats/{self.fmt}_precisions.py"


SCHEMES: dict[str, dict[str, Scheme]] = {}


def scheme(fmt: str, precision: str, *, calibrated: bool = False, options: type | None = None):
    """Register `fn(job) -> method` as how `fmt` builds `precision`."""

    def register(fn: Callable[[Job], str]) -> Callable[[Job], str]:
        SCHEMES.setdefault(fmt, {})[precision] = Scheme(fmt, precision, fn, calibrated, options)
        return fn

    return register


def schemes(fmt: str) -> dict[str, Scheme]:
    """The precisions `fmt` builds, by name."""
    importlib.import_module(f"{__package__}.{fmt}_precisions")
    return SCHEMES.get(fmt, {})


def chosen(precision: str, fmt: str) -> Scheme:
    """The scheme that builds `precision` in `fmt`, or an error naming those that exist."""
    found = schemes(fmt).get(precision)
    if found is None:
        built = ", ".join(schemes(fmt))
        elsewhere = [f for f in FORMATS if f != fmt and precision in schemes(f)]
        raise PipelineError(
            f"precision={precision} has no scheme for format={fmt} (it builds {built})"
            + (f"; format={elsewhere[0]} has one" if elsewhere else ""),
            fix=f"choose precision= one of {built}, or register a `{precision}` scheme in "
                f"stages/formats/{fmt}_precisions.py", stage="config")
    return found


def options(precision: dict[str, Any], fmt: str) -> Any:
    """The scheme's options from `precision.options`, typed by its dataclass; a key it does not
    read, or a value of the wrong type, is refused naming the keys it takes."""
    found = chosen(precision["name"], fmt)
    given = dict(precision.get("options") or {})
    if found.options is None:
        if given:
            raise PipelineError(f"precision={found.precision} ({fmt}) takes no options, got "
                                f"{', '.join(given)}", fix="remove precision.options", stage="config")
        return None
    fields = typing.get_type_hints(found.options)
    unknown = [key for key in given if key not in fields]
    if unknown:
        raise PipelineError(f"precision.options.{unknown[0]}: {found.precision} ({fmt}) does not read it",
                            fix=f"use one of: {', '.join(fields)} (declared in {found.where})", stage="config")
    typed = {}
    for key, value in given.items():
        kind = fields[key]
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise PipelineError(f"precision.options.{key}={value!r}: {found.precision} ({fmt}) takes "
                                f"{kind.__name__}", fix=f"give precision.options.{key} a {kind.__name__}",
                                stage="config")
        typed[key] = value
    return found.options(**typed)


def check(root: dict[str, Any]) -> None:
    """Before any stage runs: the precision exists for the format and its options are the
    scheme's."""
    options(root["precision"], root["format"]["name"])
