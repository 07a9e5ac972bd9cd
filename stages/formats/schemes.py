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
        return _module(self.fmt)


SCHEMES: dict[str, dict[str, Scheme]] = {}


def _module(fmt: str) -> str:
    return f"stages/formats/{fmt}_precisions.py"


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
                f"{_module(fmt)}", stage="config")
    return found


def options(precision: dict[str, Any], fmt: str) -> Any:
    """The scheme's options from `precision.options`, typed by its dataclass (OmegaConf checks
    keys and types); a key it does not read, or a value of the wrong type, is refused."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    found = chosen(precision["name"], fmt)
    given = dict(precision.get("options") or {})
    if found.options is None:
        if given:
            raise PipelineError(f"precision={found.precision} ({fmt}) takes no options, got "
                                f"{', '.join(given)}", fix="remove precision.options", stage="config")
        return None
    try:  # the dataclass's __post_init__ checks values: a ValueError names what is wrong
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(found.options), given))
    except OmegaConfBaseException as exc:
        problem = f"precision.options.{exc.full_key}: {str(exc).splitlines()[0]}"
    except ValueError as exc:
        problem = f"precision.options: {exc}"
    raise PipelineError(problem, fix=f"use the options {found.precision} ({fmt}) declares in {found.where}",
                        stage="config")


def check(root: dict[str, Any]) -> None:
    """Before any stage runs: the precision exists for the format and its options are the
    scheme's."""
    options(root["precision"], root["format"]["name"])
