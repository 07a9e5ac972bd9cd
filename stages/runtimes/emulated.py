"""An artifact run in a device's own runtime on a CPU this host is not: the format's runtime
(onnxruntime, ExecuTorch's) inside a Python under qemu-user, as devices/install.py built it.

    with EmulatedSession(command, env, "pte", Path("model.pte"), io, model="cortex-a76") as device:
        outputs = device.run({"x": x})             # numpy arrays, graph output order

One worker process per session (stages/runtimes/device_worker.py), the artifact loaded once, feeds
and outputs crossing its pipes as .npz frames, so state can be carried call by call as an app
carries it. Emulated time is not device time: a session reports no latency.
"""
from __future__ import annotations

import json
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

from .device_worker import dynamic_batch, read_frame, write_frame

WORKER = Path(__file__).with_name("device_worker.py")


class DeviceError(Exception):
    """The device's runtime failed: the message says where (loading, a call) and its own words."""


class EmulatedSession:
    def __init__(self, command: list[str], env: dict[str, str], fmt: str, artifact: Path,
                 io: dict[str, Any], threads: int = 1, options: dict[str, Any] | None = None,
                 timeout: float = 1800, model: str = ""):
        spec = {"format": fmt, "artifact": str(Path(artifact).resolve()), "threads": threads,
                "inputs": [s["name"] for s in io["inputs"]],
                "batched": dynamic_batch(io["inputs"]), **(options or {})}
        self.timeout, self.model = timeout, model
        self._stderr = tempfile.TemporaryFile()
        self._process = subprocess.Popen([*command, str(WORKER), json.dumps(spec)], env=env,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr)
        hello = self._receive("loading the artifact")
        self.runtime, self.cpu = hello["runtime"], hello["cpu"]
        self.load_seconds = hello["load_seconds"]

    def _receive(self, doing: str) -> dict[str, Any]:
        """The worker's next answer (its "__meta__" merged in), or DeviceError naming `doing`."""
        answer: list = []
        reader = threading.Thread(target=lambda: answer.append(read_frame(self._process.stdout)), daemon=True)
        reader.start()
        reader.join(self.timeout)
        if reader.is_alive():
            self.close()
            raise DeviceError(f"{doing}: no answer in {self.timeout:.0f} s")
        frame = answer[0]
        if frame is None:
            code = self._process.wait()
            raise DeviceError(f"{doing}: the runtime's process ended (exit {code}): {self._tail()}")
        meta = json.loads(str(frame.pop("__meta__")))
        if "error" in meta:
            raise DeviceError(f"{doing}: {meta['error']}")
        return {**meta, "arrays": frame}

    def _tail(self, lines: int = 6) -> str:
        self._stderr.seek(0)
        text = self._stderr.read().decode(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:]) or "nothing on stderr"

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        write_frame(self._process.stdin, {}, feed)
        answer = self._receive("running the artifact")
        return [answer["arrays"][f"o{i}"] for i in range(answer["outputs"])]

    def run_many(self, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
        return [self.run(feed) for feed in feeds]

    def describe(self) -> str:
        return f"{self.runtime}, {self.cpu['machine']} emulated by qemu-user -cpu {self.model}"

    def close(self) -> None:
        if self._process.poll() is None:
            try:
                self._process.stdin.close()
                self._process.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self._process.kill()
                self._process.wait()
        self._stderr.close()

    def __enter__(self) -> EmulatedSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
