"""Test cases that travel with an artifact: held-out inputs, the artifact's own outputs as the
expected values, eager PyTorch's outputs for reference, and the tolerances to judge them with.

Beside model.onnx, one folder per case in the layout of onnx's backend tests:

    test_data_set_<i>/input_<k>.pb, output_<k>.pb   TensorProtos named after the graph's inputs
                                                    and outputs, in graph order (expected values)
                     eager_output_<k>.pb            eager PyTorch's outputs (reference only)
                     meta.json                      tolerances, precision, host CPU, runtime

(onnx's runner globs `input_*.pb`/`output_*.pb`, onnxruntime's onnx_test_runner takes `.pb` files
whose names start with `input_`/`output_`: neither reads eager_output_<k>.pb or meta.json.)

Beside model.pte:

    model.bpte             an ExecuTorch BundledProgram: the program and the cases of "forward",
                           run on a device by ExecuTorch's bundled runner
    model.bpte.json        tolerances, input/output names, precision, host CPU, runtime
    model.bpte.eager.npz   eager PyTorch's outputs, key "<case>/<output name>"
"""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from pipelines.errors import PipelineError, first_line
from pipelines.versions import host_isa, host_cpu, library_versions, sha256_file

CASES = "test_data_set_"
METHOD = "forward"
# ExecuTorch ScalarType codes (executorch.exir.scalar_type) of the dtypes an input or output can take
SCALAR_TYPES = {0: np.uint8, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.int64, 5: np.float16,
                6: np.float32, 7: np.float64, 11: np.bool_}


BUNDLE_LIMIT = 2**31 - 2**26  # a BundledProgram is one flatbuffer holding the whole program


def unbundlable(artifact: Path) -> str | None:
    """Why a .pte's cases cannot be bundled, if they cannot: flatbuffers caps a buffer at 2 GB
    and executorch 1.5.1's serializer copies the program into one
    (devtools/bundled_program/serialize/__init__.py:157, `_pack_bundled_program` ->
    `_create_aligned_byte_vector`: "flatbuffers: cannot grow buffer beyond 2 gigabytes"). The
    .pte itself has no such limit (its weights are segments outside its flatbuffer)."""
    size = artifact.stat().st_size
    if artifact.suffix != ".pte" or size <= BUNDLE_LIMIT:
        return None
    return (f"no test cases bundled: the program is {size / 2**30:.1f} GiB and ExecuTorch's "
            "BundledProgram is one flatbuffer, which flatbuffers caps at 2 GiB")


def write(artifact: Path, io: dict[str, Any], feeds: list[dict[str, np.ndarray]],
          expected: list[list[np.ndarray]], eager: list[list[np.ndarray]],
          tolerance: Mapping[str, Any], meta: dict[str, Any]) -> list[str]:
    """Write the cases beside `artifact` (one per entry of feeds/expected/eager: a batch each);
    returns the files written, relative to its folder. `expected` are the artifact's own
    outputs, `meta` what the caller knows (at least `precision`). A .pte whose program keeps
    state (io["internal_state"]) gets its first case only, which must be the first call after
    loading: a bundle holds single calls, not a stream."""
    record = {**meta, "tolerance": {key: tolerance.get(key) for key in ("max_abs", "min_cosine")},
              "judged_by": "every expected output against the runtime's: max abs difference <= "
                           "max_abs and cosine >= min_cosine (null: not checked)",
              "host_cpu": host_cpu()}
    if artifact.suffix == ".onnx":
        return _write_onnx(artifact, feeds, expected, eager, record)
    if artifact.suffix == ".pte":
        return _write_pte(artifact, io, feeds, expected, eager, record)
    raise ValueError(f"{artifact}: test cases are written for .onnx and .pte artifacts")


def _write_onnx(artifact: Path, feeds, expected, eager, record: dict[str, Any]) -> list[str]:
    """One test_data_set_<i>/ per case: cases may differ in batch size, or a graph may take one
    example per call, and case i is the bundle's case i for the same part in ExecuTorch."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(artifact), load_external_data=False).graph
    initializers = {tensor.name for tensor in graph.initializer}
    inputs = [value.name for value in graph.input if value.name not in initializers]
    outputs = [value.name for value in graph.output]
    for old in _case_folders(artifact):
        shutil.rmtree(old)
    runtime = {"runtime": "onnxruntime", "version": library_versions()["onnxruntime"],
               "provider": "CPUExecutionProvider"}
    written = []
    for case, (feed, wanted, reference) in enumerate(zip(feeds, expected, eager, strict=True)):
        folder = artifact.parent / f"{CASES}{case}"
        folder.mkdir()
        files = {**{f"input_{k}.pb": (name, feed[name]) for k, name in enumerate(inputs)},
                 **{f"output_{k}.pb": pair for k, pair in enumerate(zip(outputs, wanted, strict=True))},
                 **{f"eager_output_{k}.pb": pair
                    for k, pair in enumerate(zip(outputs, reference, strict=True))}}
        for file, (name, array) in files.items():
            tensor = numpy_helper.from_array(np.ascontiguousarray(array), name)
            (folder / file).write_bytes(tensor.SerializeToString())
        (folder / "meta.json").write_text(json.dumps(
            {**record, "case": case, "inputs": inputs, "outputs": outputs, "expected_by": runtime,
             "eager_outputs": "eager_output_<k>.pb: eager PyTorch on the same inputs, for reference"},
            indent=1))
        written += [f"{folder.name}/{file}" for file in [*files, "meta.json"]]
    return written


def _write_pte(artifact: Path, io: dict[str, Any], feeds, expected, eager, record: dict[str, Any]) -> list[str]:
    import torch
    from executorch.devtools.bundled_program.config import MethodTestCase, MethodTestSuite
    from executorch.devtools.bundled_program.core import BundledProgram

    from ..upstream.executorch import write_bundle

    def tensor(array: np.ndarray) -> torch.Tensor:
        # a C-ordered copy: the bundle serializes a tensor's whole storage, not just its view
        return torch.from_numpy(np.array(array, order="C"))

    names = [spec["name"] for spec in io["inputs"]]
    cases = list(zip(feeds, expected, eager, strict=True))
    if io.get("internal_state"):
        cases = cases[:1]
        record["state"] = (f"the program keeps state between calls ({', '.join(io['internal_state'])}): "
                           "one case, the first call after loading; run it on a freshly loaded program "
                           "(a bundle holds single calls, not a stream)")
    suite = MethodTestSuite(METHOD, [MethodTestCase([tensor(feed[n]) for n in names],
                                                    [tensor(a) for a in wanted]) for feed, wanted, _ in cases])
    bundle = artifact.with_suffix(".bpte")
    write_bundle(BundledProgram(None, [suite], pte_file_path=str(artifact)), bundle)
    eager_file = bundle.with_name(bundle.name + ".eager.npz")
    np.savez(eager_file, **{f"{case}/{name}": array for case, (_, _, reference) in enumerate(cases)
                            for name, array in zip(io["outputs"], reference, strict=True)})
    meta_file = bundle.with_name(bundle.name + ".json")
    meta_file.write_text(json.dumps(
        {**record, "method": METHOD, "cases": len(cases), "inputs": names, "outputs": io["outputs"],
         "program_sha256": sha256_file(artifact),
         "expected_by": {"runtime": "executorch.runtime", "version": library_versions()["executorch"]},
         "eager_outputs": f"{eager_file.name}: eager PyTorch on the same inputs, key '<case>/<output>'"},
        indent=1))
    return [bundle.name, meta_file.name, eager_file.name]


def check(artifact: Path, device: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Re-run the cases beside `artifact` (.onnx, .pte or .bpte) in its runtime, or on `device`
    (a device profile, conf/target/*.yaml), and judge each output with the stored tolerances:
    {"passed", "cases": [per case and output], "reason"}. Raises PipelineError when the
    artifact or its cases are missing, or the device cannot run here."""
    artifact = Path(artifact)
    if not artifact.is_file():
        raise PipelineError(f"{artifact}: no such file")
    if artifact.suffix not in (".onnx", ".pte", ".bpte"):
        raise PipelineError(f"{artifact}: not a .onnx, .pte or .bpte file")
    if device is not None:
        return _check_on_device(artifact, device)
    if artifact.suffix == ".onnx":
        return _check_onnx(artifact)
    return _check_bundle(artifact.with_suffix(".bpte"))


def _check_on_device(artifact: Path, device: Mapping[str, Any]) -> dict[str, Any]:
    """The cases through the device's own runtime (stages/runtimes/devices.py): an .onnx's
    test_data_set_<i>/, a .bpte's program and cases, each case a call of a fresh session."""
    import tempfile

    from ..runtimes.devices import place

    fmt = "onnx" if artifact.suffix == ".onnx" else "pte"
    placement = place(device, fmt)
    if not placement.runs:
        raise PipelineError(f"{device['name']} cannot run {artifact.name} here: {placement.reason}")
    with tempfile.TemporaryDirectory() as tmp:
        if fmt == "onnx":
            model, cases = artifact, _onnx_cases(artifact)
        else:
            bundle = artifact.with_suffix(".bpte")
            if not bundle.is_file():
                raise PipelineError(f"{bundle.with_suffix('.pte')}: no test cases beside it ({bundle.name} missing)")
            meta = _meta(bundle.with_name(bundle.name + ".json"))
            program, suites = read_bundle(bundle, bundle.read_bytes())
            model = Path(tmp) / "model.pte"
            model.write_bytes(program.tobytes())
            cases = [(case, meta["tolerance"], dict(zip(meta["inputs"], inputs)), list(zip(meta["outputs"], expected)))
                     for case, (inputs, expected) in enumerate(suites[meta["method"]])]
        results, doing = [], "cannot load it"
        try:  # one session: a program with state carries one case only (the first call after loading)
            with placement.session(model, {"inputs": [{"name": n, "dynamic": {}} for n in cases[0][2]]}) as session:
                for case, tolerance, feed, wanted in cases:
                    doing = f"failed on case {case}"
                    actual = session.run(feed)
                    results.append((case, tolerance, [(name, want, got) for (name, want), got in zip(wanted, actual)]))
        except Exception as exc:  # the device's runtime: DeviceError, or a native session's own
            return _judge(results, f"{device['name']} {doing}: {first_line(exc)}")
    return _judge(results)


def _onnx_cases(artifact: Path) -> list[tuple[int, Any, dict[str, np.ndarray], list[tuple[str, np.ndarray]]]]:
    """(case, tolerance, feed, [(output name, expected)]) of each test_data_set_<i>/ beside it."""
    from onnx import numpy_helper

    folders = _case_folders(artifact)
    if not folders:
        raise PipelineError(f"{artifact}: no test cases beside it ({CASES}0/ missing)")
    return [(int(f.name[len(CASES):]), _meta(f / "meta.json")["tolerance"],
             {t.name: numpy_helper.to_array(t) for t in _tensors(f, "input")},
             [(t.name, numpy_helper.to_array(t)) for t in _tensors(f, "output")]) for f in folders]


def _check_onnx(artifact: Path) -> dict[str, Any]:
    cases = _onnx_cases(artifact)
    # off the target's CPUs, as verify computed the expected outputs: the graph's own int8
    # arithmetic, not this CPU's fused kernels, which the artifact's target does not have
    as_written = host_isa() not in _meta(_case_folders(artifact)[0] / "meta.json").get("target_isa", [host_isa()])
    results, doing = [], "cannot load it"
    try:
        from ..formats.onnx import session as onnx_session

        session = onnx_session(artifact, as_written=as_written)
        for case, tolerance, feed, wanted in cases:
            doing = f"failed on case {case}"
            actual = session.run([name for name, _ in wanted], feed)
            results.append((case, tolerance, [(name, want, got) for (name, want), got in zip(wanted, actual)]))
    except Exception as exc:  # onnxruntime raises a dozen unrelated classes (Fail, InvalidArgument...)
        return _judge(results, f"onnxruntime {doing}: {first_line(exc)}")
    return _judge(results)


def _check_bundle(bundle: Path) -> dict[str, Any]:
    """Each case through ExecuTorch's bundled-program path (load_bundled_input, execute), on a
    freshly loaded program, as the bundled runner runs one case per load; its own comparison is
    given no bound, the outputs are judged here with max_abs and cosine."""
    from executorch.extension.pybindings.portable_lib import _load_bundled_program_from_buffer

    from ..runtimes.device_worker import load_kernel_libraries

    if not bundle.is_file():
        raise PipelineError(f"{bundle.with_suffix('.pte')}: no test cases beside it ({bundle.name} missing)")
    meta = _meta(bundle.with_name(bundle.name + ".json"))
    data = bundle.read_bytes()
    program, suites = read_bundle(bundle, data)
    pte = bundle.with_suffix(".pte")
    if pte.is_file() and pte.read_bytes() != program.tobytes():
        return _judge([], f"{bundle.name} holds another program than {pte.name} (rebuilt after bundling?)")
    if meta["method"] not in suites:
        raise PipelineError(f"{bundle}: no test cases for method '{meta['method']}'")
    load_kernel_libraries(str(pte))
    results = []
    for case, (_, expected) in enumerate(suites[meta["method"]]):
        try:
            loaded = _load_bundled_program_from_buffer(data)
            actual = [o.numpy().copy() for o in
                      loaded.verify_result_with_bundled_expected_output(meta["method"], case, 0.0, math.inf)]
        except RuntimeError as exc:
            return _judge(results, f"case {case}: ExecuTorch failed to run it: {first_line(exc)}")
        results.append((case, meta["tolerance"], list(zip(meta["outputs"], expected, actual))))
    return _judge(results)


Case = tuple[list[np.ndarray], list[np.ndarray]]  # inputs, expected outputs


def read_bundle(path: Path, data: bytes) -> tuple[np.ndarray, dict[str, list[Case]]]:
    """A .bpte's program bytes and, by method, its cases as (inputs, expected outputs), read in
    place: executorch's deserializer goes through JSON (seconds per MB of program) and its
    generated readers fail on nested tables (each class is shadowed by its module's name)."""
    import struct

    from executorch.devtools.bundled_program.serialize.generated.bundled_program_flatbuffer.Tensor import Tensor
    from flatbuffers import encode, packer
    from flatbuffers.number_types import Uint8Flags
    from flatbuffers.table import Table

    def tables(table: Table, slot: int) -> list[Table]:  # a vector of tables (slots 4, 6, 8: schema order)
        offset = table.Offset(slot)
        if not offset:
            return []
        start = table.Vector(offset)
        return [Table(table.Bytes, table.Indirect(start + 4 * j)) for j in range(table.VectorLen(offset))]

    def tensors(values: list[Table]) -> list[np.ndarray]:  # Values whose union (slot 6) holds a Tensor
        arrays = []
        for value in values:
            tensor = Tensor()
            tensor.Init(data, value.Indirect(value.Offset(6) + value.Pos))
            dtype = SCALAR_TYPES[tensor.ScalarType()]
            arrays.append(tensor.DataAsNumpy().view(dtype).reshape(tensor.SizesAsNumpy()))
        return arrays

    if data[4:8] != b"BP08":
        raise PipelineError(f"{path}: not an ExecuTorch bundled program (identifier {data[4:8]!r})")
    try:
        root = Table(data, encode.Get(packer.uoffset, data, 0))
        suites = {suite.String(suite.Offset(4) + suite.Pos).decode():
                  [(tensors(tables(case, 4)), tensors(tables(case, 6))) for case in tables(suite, 6)]
                  for suite in tables(root, 6)}
        return root.GetVectorAsNumpy(Uint8Flags, root.Offset(8)), suites
    except (IndexError, KeyError, ValueError, struct.error) as exc:
        raise PipelineError(f"{path}: unreadable as an ExecuTorch bundled program ({exc!r})") from None


def _judge(results: list[tuple[int, Mapping[str, Any], list[tuple[str, np.ndarray, np.ndarray]]]],
           error: str = "") -> dict[str, Any]:
    """Every output of every case against its tolerance; the first one missed (or `error`, what
    stopped the run) is the reason."""
    from .fidelity import compare

    rows, misses = [], []
    for case, tolerance, outputs in results:
        for name, want, got in outputs:
            if want.dtype.kind not in "fc":  # classes, labels: the top one must agree (lower ranks
                top = want.shape == got.shape and np.array_equal(want[..., :1], got[..., :1])  # may swap)
                metrics = {"max_abs": 0.0 if np.array_equal(want, got) else float("nan"), "cosine": float(top)}
                miss = "" if top else f"top class {got[..., :1].ravel().tolist()}, expected {want[..., :1].ravel().tolist()}"
            else:
                metrics = compare(want, got)
                miss = _missed(metrics, tolerance)
            rows.append({"case": case, "output": name, "max_abs": metrics["max_abs"],
                         "cosine": metrics["cosine"], "passed": not miss})
            if miss:
                misses.append(f"case {case} output '{name}' {miss}")
    reason = error or (misses[0] if misses else "" if rows else "no expected outputs to compare")
    return {"passed": not reason, "cases": rows, "reason": reason}


def _missed(metrics: dict[str, Any], tolerance: Mapping[str, Any]) -> str:
    if "shape_mismatch" in metrics:
        got, want = metrics["shape_mismatch"][1], metrics["shape_mismatch"][0]
        return f"has shape {got}, expected {want}"
    max_abs, min_cosine = tolerance.get("max_abs"), tolerance.get("min_cosine")
    if max_abs is not None and not metrics["max_abs"] <= max_abs:
        return f"max abs {metrics['max_abs']:.3g} > {max_abs:g}"
    if min_cosine is not None and not metrics["cosine"] >= min_cosine:
        return f"cosine {metrics['cosine']:.6f} < {min_cosine:g}"
    return ""


def _case_folders(artifact: Path) -> list[Path]:
    folders = [p for p in artifact.parent.glob(CASES + "*") if re.fullmatch(CASES + r"\d+", p.name)]
    return sorted(folders, key=lambda p: int(p.name[len(CASES):]))


def _tensors(folder: Path, prefix: str) -> list[Any]:
    """<prefix>_<k>.pb in k order, as onnx's backend test runner reads them."""
    import onnx
    from google.protobuf.message import DecodeError

    files = [p for p in folder.glob(f"{prefix}_*.pb") if re.fullmatch(prefix + r"_\d+\.pb", p.name)]
    tensors = []
    for path in sorted(files, key=lambda p: int(p.stem.split("_")[-1])):
        try:
            tensors.append(onnx.load_tensor(str(path)))
        except DecodeError as exc:
            raise PipelineError(f"{path}: not a serialized onnx.TensorProto ({exc})") from None
    return tensors


def _meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path}: missing (it holds the tolerances the cases are judged with)") from None
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{path}: not valid JSON ({exc})") from None
