"""Runs one artifact for the host inside a device's own Python: the arm64 Python of the emulated
runtimes under qemu-user, or the project's venv under an emulated x86 CPU (stages/runtimes/emulated.py
starts it). Standalone on purpose: it imports numpy and the format's runtime only (onnxruntime,
or ExecuTorch's runtime bindings without its compiler), never the project.

    python device_worker.py '{"format": "onnx", "artifact": "/x/model.onnx", "threads": 1, ...}'

Messages on stdin/stdout are frames: an 8-byte big-endian length, then an .npz whose "__meta__"
entry is JSON. The worker answers the start with its CPU's features and runtime, then each feed
(the graph's inputs by name) with the outputs in graph order, or {"error": ...}. Libraries that
print write to stderr: the protocol has stdout to itself.
"""
from __future__ import annotations

import io
import json
import os
import platform
import struct
import sys
import time
import traceback

import numpy as np


def read_frame(stream) -> dict[str, np.ndarray] | None:
    """The next frame's arrays (and "__meta__"), or None at the end of the stream."""
    head = stream.read(8)
    if len(head) < 8:
        return None
    (size,) = struct.unpack(">Q", head)
    body = stream.read(size)
    with np.load(io.BytesIO(body), allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def write_frame(stream, meta: dict, arrays: dict[str, np.ndarray] | None = None) -> None:
    buffer = io.BytesIO()
    safe = {name: (value.astype(str) if value.dtype.kind == "O" else value) for name, value in (arrays or {}).items()}
    np.savez(buffer, __meta__=np.asarray(json.dumps(meta)), **safe)
    body = buffer.getvalue()
    stream.write(struct.pack(">Q", len(body)) + body)
    stream.flush()


def cpu_features() -> dict[str, object]:
    """What this (possibly emulated) CPU says it is: the features numpy's runtime dispatch found
    by asking the CPU itself (CPUID on x86, HWCAP on arm64; under qemu-user, the emulated
    model's), and the model name /proc/cpuinfo gives."""
    from numpy._core._multiarray_umath import __cpu_features__

    model = ""
    try:
        with open("/proc/cpuinfo") as handle:
            model = next((line.partition(":")[2].strip() for line in handle
                          if line.split(":")[0].strip() in ("model name", "CPU part")), "")
    except OSError:
        pass
    return {"machine": platform.machine(), "model": model,
            "flags": sorted(name.lower() for name, present in __cpu_features__.items() if present)}


def open_onnx(spec: dict):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = spec["threads"], 1
    if spec.get("custom_ops"):
        options.register_custom_ops_library(_extensions_library())
    session = ort.InferenceSession(spec["artifact"], options, providers=["CPUExecutionProvider"],
                                   disabled_optimizers=spec.get("disabled_optimizers") or [])
    names, inputs = [o.name for o in session.get_outputs()], [i.name for i in session.get_inputs()]

    def run(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return session.run(names, {k: (feed[k].astype(object) if feed[k].dtype.kind == "U" else feed[k])
                                   for k in inputs})

    return run, f"onnxruntime {ort.__version__} CPU"


def _extensions_library() -> str:
    """onnxruntime-extensions' custom-op library, found without importing its package (whose
    __init__ imports onnx and more: 30 s on an emulated x86 CPU)."""
    import glob
    from importlib.util import find_spec

    package = find_spec("onnxruntime_extensions").submodule_search_locations[0]
    return glob.glob(os.path.join(package, "_extensions_pydll*.so"))[0]


# runtime/core/error.h of ExecuTorch: the codes its calls fail with
EXECUTORCH_ERRORS = {
    0x01: "Internal", 0x02: "InvalidState", 0x03: "EndOfMethod", 0x04: "AlreadyLoaded",
    0x10: "NotSupported", 0x11: "NotImplemented", 0x12: "InvalidArgument", 0x13: "InvalidType",
    0x14: "OperatorMissing", 0x20: "NotFound", 0x21: "MemoryAllocationFailed", 0x22: "AccessFailed",
    0x23: "InvalidProgram", 0x24: "InvalidExternalData", 0x25: "OutOfResources",
    0x30: "DelegateInvalidCompatibility", 0x31: "DelegateMemoryAllocationFailed", 0x32: "DelegateInvalidHandle",
}


class CallFailed(RuntimeError):
    """A runtime call that failed, with the model's module it failed in when known (the runner
    passes it on: a repair keeps that module in float first)."""

    def __init__(self, message: str, module: str | None = None):
        super().__init__(message)
        self.module = module


def executorch_failure(message: str, again, artifact: str) -> CallFailed:
    """A failed ExecuTorch call explained: the error's name, and the operator, instruction and
    kernel check that failed, which only the runtime's own log on fd 2 says ("KernelCall failed
    at instruction 0:1 in operator aten::scalar_tensor.out: 0x12"): the call is made `again`
    with that log captured (a failure on the same inputs repeats), and the operator traced to
    the model's modules that lowering recorded beside the artifact (program_stats.json)."""
    import re
    import tempfile

    found = re.search(r"error (0x[0-9a-fA-F]+)", message)
    if not found:
        return CallFailed(message)
    code = int(found.group(1), 16)
    with tempfile.TemporaryFile() as log:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            again()
        except Exception:  # noqa: BLE001  the failure is what is wanted: its log
            pass
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        text = log.read().decode(errors="replace")
    explained = f"ExecuTorch error 0x{code:x} ({EXECUTORCH_ERRORS.get(code, 'unknown code')})"
    call = re.search(r"failed at instruction (\S+) in operator (\S+?):? 0x", text)
    modules: list[str] = []
    if call:
        operator = call.group(2)
        explained += f" in operator {operator} (instruction {call.group(1)})"
        check = re.search(r"\[(op_\w+\.cpp:\d+)\] (Check failed[^\n]*)", text)
        explained += f": {check.group(1)} {check.group(2).strip().rstrip(':')}" if check else ""
        modules = lowered(artifact).get("operator_modules", {}).get(operator.split("::")[-1].split(".")[0], [])
        explained += f"; from module {', '.join(modules)}" if modules else ""
    return CallFailed(f"{explained} [{message}]", modules[0] if len(modules) == 1 else None)


def lowered(artifact: str) -> dict:
    """What lowering recorded beside a .pte (program_stats.json), {} for a .pte from elsewhere."""
    stats = os.path.join(os.path.dirname(artifact), "program_stats.json")
    if not os.path.exists(stats):
        return {}
    with open(stats) as handle:
        return json.load(handle)


def load_kernel_libraries(artifact: str) -> list[str]:
    """The ExecuTorch kernel libraries a .pte's operators outside the delegate need, registered
    in this process (program_stats.json beside it lists them; lowering writes it): ExecuTorch's
    quantized kernels (a 4-bit embedding table's quantized_decomposed::embedding_4bit), which an
    app links as quantized_ops_lib. Loading them imports torch: only when the program needs them."""
    libraries = lowered(artifact).get("kernel_libraries", [])
    if "quantized" in libraries:
        import executorch.kernels.quantized  # noqa: F401  registers them with the runtime
    return libraries


def open_pte(spec: dict):
    """The program through ExecuTorch's runtime bindings (XNNPACK registered), a batch larger than
    its planned one split as the host's backend splits it. The bindings' extension itself, not
    portable_lib, which imports the exir compiler stack (sympy and more: 30 s emulated)."""
    from executorch.extension.pybindings import _C as portable_lib

    from importlib.metadata import version

    portable_lib._unsafe_reset_threadpool(spec["threads"])
    load_kernel_libraries(spec["artifact"])
    module = portable_lib._load_for_executorch(spec["artifact"])
    return (pte_runner(module.forward, module.method_meta("forward"), spec["inputs"], spec["batched"],
                       spec["artifact"]),
            f"executorch {version('executorch')} runtime, XNNPACK")


def dynamic_batch(specs: list[dict]) -> bool:
    """Whether every input's dim 0 is dynamic (a batch that may be run in pieces)."""
    return all("0" in map(str, spec.get("dynamic") or {}) for spec in specs)


def pte_runner(forward, meta, names: list[str], batched: bool, artifact: str):
    """fn(feed) -> outputs of a loaded program's forward (a list of tensors in, tensors out); a
    batch larger than the program's planned one is run in pieces when the batch is dynamic; a
    failing call raises an error that names ExecuTorch's error, the operator and its module.
    The host's backend (stages/formats/pte.py) runs its programs with it too."""
    import torch

    bound = min(meta.input_tensor_meta(i).sizes()[0] for i in range(meta.num_inputs()))

    def execute(batch: dict[str, np.ndarray]) -> list[np.ndarray]:
        tensors = [torch.from_numpy(np.ascontiguousarray(batch[n])) for n in names]
        try:
            outputs = forward(tensors)
        except RuntimeError as exc:
            raise executorch_failure(str(exc), lambda: forward(tensors), artifact) from None
        return [o.detach().numpy() if isinstance(o, torch.Tensor) else np.asarray(o) for o in outputs]

    def run(batch: dict[str, np.ndarray]) -> list[np.ndarray]:
        rows = len(batch[names[0]])
        if not batched or rows <= bound:
            return execute(batch)
        pieces = [execute({n: a[i:i + bound] for n, a in batch.items()}) for i in range(0, rows, bound)]
        return [np.concatenate(outs) for outs in zip(*pieces)]

    return run


def main() -> int:
    protocol = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything a library prints goes to stderr
    requests = sys.stdin.buffer
    spec = json.loads(sys.argv[1])
    started = time.monotonic()
    try:
        run, runtime = (open_onnx if spec["format"] == "onnx" else open_pte)(spec)
    except Exception as exc:  # the host names the device and the artifact
        write_frame(protocol, {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()})
        return 1
    write_frame(protocol, {"ready": True, "runtime": runtime, "cpu": cpu_features(),
                           "python": platform.python_version(), "load_seconds": round(time.monotonic() - started, 2)})
    while (frame := read_frame(requests)) is not None:
        frame.pop("__meta__", None)
        try:
            outputs = run(frame)
        except Exception as exc:
            write_frame(protocol, {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()})
            continue
        write_frame(protocol, {"outputs": len(outputs)}, {f"o{i}": np.asarray(o) for i, o in enumerate(outputs)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
