"""Where each device of a target (conf/target/*.yaml `devices:`) runs on this host: natively
when the host is one (same instruction set, the features the device names agree), under
qemu-user when the device names a CPU model and emulation is on, in Chromium for the browser;
otherwise not at all, with a reason a user can act on.

    for device in cfg.target.devices:
        placement = place(device, "onnx", emulate=True)
        with placement.session(artifact, io, threads=1) as session: ...
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from pipelines.errors import PipelineError
from pipelines.versions import host_cpu, host_isa

FORMATS = {"cpu": ("onnx", "pte"), "browser": ("onnx",)}


@dataclass(frozen=True)
class Placement:
    device: str
    mode: str  # native | emulated | browser | skipped | n/a
    reason: str = ""
    command: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    fmt: str = ""
    cpu: str = ""  # emulated: the qemu CPU model

    @property
    def runs(self) -> bool:
        return self.mode in ("native", "emulated", "browser")

    def session(self, artifact: Path, io: dict[str, Any], threads: int = 1):
        """A context manager with run(feed) -> outputs, run_many(feeds) and describe()."""
        if self.mode == "browser":
            from . import browser

            return browser.session(artifact, threads)
        if self.mode == "emulated":
            from .emulated import EmulatedSession

            return EmulatedSession(list(self.command), dict(self.env), self.fmt, artifact, io, threads,
                                   _runtime_options(self.fmt, artifact), model=self.cpu)
        if self.mode == "native":
            return _NativeSession(self.fmt, artifact, io, threads)
        raise RuntimeError(f"{self.device} does not run here: {self.reason}")


def profile(name: str) -> dict[str, Any]:
    """A device that conf/target/*.yaml lists, by name (for a command line or a test)."""
    import yaml

    conf = Path(__file__).resolve().parents[2] / "conf" / "target"
    found = {d["name"]: d for path in sorted(conf.glob("*.yaml"))
             for d in yaml.safe_load(path.read_text()).get("devices") or []}
    if name not in found:
        raise PipelineError(f"no device {name!r} in {conf}/*.yaml", fix=f"one of: {', '.join(found)}")
    return found[name]


def host_matches(device: Mapping[str, Any]) -> list[str]:
    """What keeps this host from being the device: [] when it is one."""
    cpu = host_cpu()
    if host_isa() != device["isa"]:
        return [f"isa {device['isa']} (this host is {host_isa()})"]
    return [f"{'no ' * (not wanted)}{feature}" for feature, wanted in (device.get("features") or {}).items()
            if bool(cpu.get(feature)) != bool(wanted)]


def place(device: Mapping[str, Any], fmt: str, emulate: bool = True) -> Placement:
    name, runtime = device["name"], device.get("runtime", "cpu")
    if fmt not in FORMATS[runtime]:
        return Placement(name, "n/a", f"a {runtime} device runs {' and '.join(FORMATS[runtime])} artifacts, not .{fmt}")
    if runtime == "browser":
        from . import browser

        reason = browser.available()
        return Placement(name, "skipped", reason) if reason else Placement(name, "browser", fmt=fmt)
    if not (missing := host_matches(device)):
        return Placement(name, "native", fmt=fmt)
    cpu = device.get("cpu")
    if not cpu:
        return Placement(name, "skipped",
                         f"it needs {', '.join(missing)}, qemu-user cannot emulate that, and this host "
                         f"({host_cpu()['model']}) is not one: verify on such a host, or drop {name} from "
                         "target.devices")
    if device["isa"] == "x86_64" and host_isa() != "x86_64":
        return Placement(name, "skipped", f"an x86-64 CPU model is emulated with this host's own venv, which is {host_isa()}")
    if not emulate:
        return Placement(name, "skipped", "it would run emulated here, and verify.emulate=false")
    from devices.install import runtime_command

    command = runtime_command(device["isa"], cpu)
    if isinstance(command, str):
        return Placement(name, "skipped", command)
    argv, env = command
    return Placement(name, "emulated", command=tuple(argv), env=env, fmt=fmt, cpu=cpu)


def environment(devices, fmt: str, emulate: bool) -> dict[str, Any]:
    """What each device's figures depend on here, read cheaply (for verify_target's cache key):
    how it runs, the host's features for a native one, the runtime tree for an emulated one."""
    from devices.install import ready_tree

    described = {}
    for device in devices:
        placement = place(device, fmt, emulate)
        entry: dict[str, Any] = {"mode": placement.mode}
        if placement.mode == "native":
            entry["host"] = {k: v for k, v in host_cpu().items() if k not in ("model", "cores")}
        elif placement.mode == "emulated":
            tree = ready_tree()
            entry.update(cpu=device.get("cpu"), tree=tree.name if tree else None)
        elif placement.mode == "browser":
            from . import browser

            entry.update(browser.environment())
        else:
            entry["reason"] = placement.reason
        described[device["name"]] = entry
    return described


def _runtime_options(fmt: str, artifact: Path) -> dict[str, Any]:
    """What the device's session needs to open the artifact as the host's backend does: the
    optimizers that crash on the graph off, onnxruntime-extensions where the graph uses its ops."""
    if fmt != "onnx":
        return {}
    import onnx

    from ..processing import uses_custom_ops
    from ..upstream.onnxruntime import unsafe_optimizers

    proto = onnx.load(str(artifact), load_external_data=False)
    return {"custom_ops": uses_custom_ops(proto), "disabled_optimizers": sorted(unsafe_optimizers(proto))}


class _NativeSession(contextlib.AbstractContextManager):
    """The host is the device: the format's own runtime in this process, its own fused kernels."""

    def __init__(self, fmt: str, artifact: Path, io: dict[str, Any], threads: int):
        from ..formats import backend

        from .device_worker import cpu_features

        self._backend = backend(fmt)
        self._step = self._backend.load(artifact, io, threads)
        self.cpu = cpu_features()

    def run(self, feed):
        return self._step(feed)

    def run_many(self, feeds):
        return [self._step(feed) for feed in feeds]

    def describe(self) -> str:
        return f"{self._backend.runtime()}, native ({host_cpu()['model']})"

    def __exit__(self, *exc) -> None:
        self._step = None
