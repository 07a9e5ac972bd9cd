"""Library versions and source hashes, read without importing the heavy libraries."""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import platform
import subprocess
from functools import lru_cache
from pathlib import Path

from .memory import usable_cores

TRACKED_PACKAGES = ("torch", "torchao", "executorch", "onnx", "onnxruntime", "onnxscript", "numpy")


@lru_cache(maxsize=None)
def library_versions() -> dict[str, str]:
    """Installed versions of the libraries whose behaviour shapes an artifact."""
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@lru_cache(maxsize=None)
def module_source_hash(module_name: str) -> str:
    """sha256 of a module's source (all .py files for a package), found without executing it."""
    spec = importlib.util.find_spec(module_name)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(module_name)
    origin = Path(spec.origin)
    files = sorted(origin.parent.rglob("*.py")) if origin.name == "__init__.py" else [origin]
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def git_commit(cwd: Path) -> str | None:
    """The checkout's commit, with '+dirty' when the tree has uncommitted changes."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


CPU_FEATURES = {  # what the numbers of int8 and fp16 kernels depend on, by flag in /proc/cpuinfo
    "vnni": ("avx512_vnni", "avx_vnni", "asimddp"),  # int8 dot products without int16 saturation
    "avx2": ("avx2",),
    "avx512": ("avx512f",),
    "fp16": ("avx512_fp16", "asimdhp"),  # native half-precision arithmetic
    "f16c": ("f16c",),  # half <-> float conversion only
}


@lru_cache(maxsize=None)
def host_cpu() -> dict[str, object]:
    """The build machine's CPU, recorded in the manifest: no verdict may depend on it, but a
    number measured on it (a latency, a native int8 kernel's output) is only read with it."""
    flags: set[str] = set()
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
            elif key.strip() in ("model name", "CPU part") and not model:
                model = value.strip()
    except OSError:
        pass
    return {"machine": platform.machine(), "model": model or platform.processor() or "unknown",
            "cores": usable_cores(),
            **{name: any(f in flags for f in names) for name, names in CPU_FEATURES.items()}}


def host_isa() -> str:
    """This host's instruction set, as targets name them (x86_64, arm64)."""
    machine = platform.machine()
    return {"AMD64": "x86_64", "aarch64": "arm64"}.get(machine, machine)


