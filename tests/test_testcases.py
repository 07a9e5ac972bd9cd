"""Test cases that travel with artifacts (stages/support/testcases.py, pipelines/check_artifact.py): written
beside a tiny .onnx and .pte, re-run in onnxruntime and through ExecuTorch's bundled program, read
by onnx's own backend test runner, and failing by case and output when tampered with."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import unittest
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipelines.check_artifact import main
from stages.support.testcases import check, write
from tests.conftest import ROOT

TOLERANCE = {"max_abs": 1e-4, "min_cosine": 0.99999}
IO = {"inputs": [{"name": "x", "shape": [1, 8], "dtype": "float32", "dynamic": {"0": "batch"}},
                 {"name": "ids", "shape": [1], "dtype": "int64", "dynamic": {"0": "batch"}}],
      "outputs": ["logits", "top"], "state": [], "internal_state": []}
# ExecuTorch warns about every mutable buffer, also the ones serialized with their values
pytestmark = pytest.mark.filterwarnings("ignore:Mutation on a buffer:UserWarning")


class TwoByTwo(nn.Module):
    """A float32 and an int64 input; a float32 and an int64 output."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, ids: torch.Tensor):
        logits = self.head(torch.relu(x + self.embed(ids)))
        return logits, logits.argmax(-1)


def _feeds() -> list[dict[str, np.ndarray]]:
    """Two cases of different batch sizes."""
    rng = np.random.default_rng(0)
    return [{"x": rng.standard_normal((rows, 8)).astype(np.float32), "ids": rng.integers(0, 10, rows)}
            for rows in (4, 2)]


def _eager(model: nn.Module, feeds) -> list[list[np.ndarray]]:
    with torch.no_grad():
        return [[o.numpy() for o in model(*(torch.from_numpy(a) for a in feed.values()))] for feed in feeds]


def _lower(model: nn.Module, args: tuple, dynamic_shapes=None) -> bytes:
    """A .pte as the pipeline builds one: XNNPACK-delegated, mutable buffers with their values."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass

    program = torch.export.export(model, args, dynamic_shapes=dynamic_shapes)
    signature = program.graph_signature
    mutated = set(signature.buffers_to_mutate.values())
    buffers = [spec.arg.name for spec in signature.input_specs if spec.target in mutated]
    edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    return edge.to_executorch(ExecutorchBackendConfig(passes=[InitializedMutableBufferPass(buffers)])).buffer


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """model.onnx and model.pte of TwoByTwo with a dynamic batch, their cases not yet written."""
    folder = tmp_path_factory.mktemp("artifacts")
    torch.manual_seed(0)
    model = TwoByTwo().eval()
    args = (torch.randn(2, 8), torch.tensor([1, 2]))
    batch = torch.export.Dim("batch", max=16)
    shapes = {"x": {0: batch}, "ids": {0: batch}}
    torch.onnx.export(model, args, dynamo=True, input_names=["x", "ids"], output_names=IO["outputs"],
                      dynamic_shapes=shapes, verbose=False).save(str(folder / "model.onnx"))
    (folder / "model.pte").write_bytes(_lower(model, args, shapes))
    np.savez(folder / "eager.npz", *[a for case in _eager(model, _feeds()) for a in case])
    return folder


@pytest.fixture
def artifacts(built: Path, tmp_path: Path) -> Path:
    """A fresh copy of the built artifacts with their cases written (the test may tamper with it)."""
    folder = tmp_path / "classifier"
    shutil.copytree(built, folder)
    for name in ("model.onnx", "model.pte"):
        _write(folder / name)
    return folder


def _write(artifact: Path, expected: list[list[np.ndarray]] | None = None) -> list[str]:
    """Cases with the artifact's own outputs (run by the pipeline's format backend) as expected."""
    from stages.formats import backend

    feeds = _feeds()
    with np.load(artifact.parent / "eager.npz") as data:
        flat = [data[f"arr_{i}"] for i in range(len(data.files))]
    eager = [flat[0:2], flat[2:4]]
    run = backend(artifact.suffix[1:]).load(artifact, IO)
    expected = expected or [run(feed) for feed in feeds]
    return write(artifact, IO, feeds, expected, eager, TOLERANCE, {"precision": "fp32", "part": "classifier"})


def test_onnx_cases_pass_in_onnxruntime(artifacts: Path):
    files = _write(artifacts / "model.onnx")
    assert files[:6] == ["test_data_set_0/input_0.pb", "test_data_set_0/input_1.pb",
                         "test_data_set_0/output_0.pb", "test_data_set_0/output_1.pb",
                         "test_data_set_0/eager_output_0.pb", "test_data_set_0/eager_output_1.pb"]
    assert files[6:8] == ["test_data_set_0/meta.json", "test_data_set_1/input_0.pb"]
    result = check(artifacts / "model.onnx")
    assert result["passed"], result["reason"]
    assert [(r["case"], r["output"]) for r in result["cases"]] == [
        (0, "logits"), (0, "top"), (1, "logits"), (1, "top")]
    meta = json.loads((artifacts / "test_data_set_1" / "meta.json").read_text())
    assert meta["tolerance"] == TOLERANCE and meta["precision"] == "fp32" and meta["case"] == 1
    assert meta["expected_by"]["runtime"] == "onnxruntime" and "avx2" in meta["host_cpu"]


def test_onnx_layout_is_read_by_onnx_helpers(artifacts: Path):
    """onnx.numpy_helper reads what was fed, named after the graph's inputs, int64 kept."""
    import onnx
    from onnx import numpy_helper

    case = artifacts / "test_data_set_0"
    x, ids = (onnx.load_tensor(str(case / f"input_{k}.pb")) for k in (0, 1))
    assert (x.name, ids.name) == ("x", "ids")
    np.testing.assert_array_equal(numpy_helper.to_array(x), _feeds()[0]["x"])
    assert numpy_helper.to_array(ids).dtype == np.int64
    assert onnx.load_tensor(str(case / "eager_output_1.pb")).name == "top"


def test_onnx_layout_passes_onnx_backend_test_runner(artifacts: Path, monkeypatch):
    """onnx's own runner (onnx.backend.test.runner), with onnxruntime as the backend, globs
    input_*.pb/output_*.pb in every test_data_set*: the eager outputs and meta.json beside them
    do not confuse it (an extra output file would be compared against a missing output)."""
    import onnxruntime.backend
    from onnx.backend.test import loader, runner

    data = artifacts.parent / "data"
    (data / "real").mkdir(parents=True)
    artifacts.rename(data / "real" / "test_classifier")
    # only this model: the runner otherwise builds its ~1700 node tests first (10 s)
    monkeypatch.setattr(runner, "load_model_tests",
                        lambda kind: loader.load_model_tests(str(data), kind) if kind == "real" else [])
    cases = runner.Runner(onnxruntime.backend).test_cases
    result = unittest.TextTestRunner(verbosity=0).run(unittest.defaultTestLoader.loadTestsFromTestCase(
        cases["OnnxBackendRealModelTest"]))
    assert result.wasSuccessful() and result.testsRun - len(result.skipped) == 1


def test_onnx_tampered_model_fails_naming_case_and_output(artifacts: Path):
    import onnx
    from onnx import numpy_helper

    path = artifacts / "model.onnx"
    model = onnx.load(str(path))
    weight = next(t for t in model.graph.initializer if "head" in t.name and "weight" in t.name)
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.5, weight.name))
    onnx.save(model, str(path))
    result = check(path)
    assert not result["passed"]
    assert result["reason"].startswith("case 0 output 'logits' max abs "), result["reason"]


def test_onnx_tampered_expected_output_fails(artifacts: Path):
    import onnx
    from onnx import numpy_helper

    path = artifacts / "test_data_set_1" / "output_0.pb"
    tensor = onnx.load_tensor(str(path))
    tampered = numpy_helper.from_array(numpy_helper.to_array(tensor) + 0.5, tensor.name)
    path.write_bytes(tampered.SerializeToString())
    result = check(artifacts / "model.onnx")
    assert result["reason"].startswith("case 1 output 'logits' max abs 0.5 > 0.0001"), result["reason"]
    assert [r["passed"] for r in result["cases"]] == [True, True, False, True]


def test_pte_bundle_passes_through_executorch_bundled_program(artifacts: Path):
    from stages.support.testcases import read_bundle

    assert _write(artifacts / "model.pte") == ["model.bpte", "model.bpte.json", "model.bpte.eager.npz"]
    for path in ("model.pte", "model.bpte"):
        result = check(artifacts / path)
        assert result["passed"], result["reason"]
        assert len(result["cases"]) == 4
    meta = json.loads((artifacts / "model.bpte.json").read_text())
    assert (meta["cases"], meta["outputs"], meta["tolerance"]) == (2, ["logits", "top"], TOLERANCE)
    assert "state" not in meta and meta["expected_by"]["runtime"] == "executorch.runtime"
    with np.load(artifacts / "model.bpte.eager.npz") as eager:
        assert sorted(eager.files) == ["0/logits", "0/top", "1/logits", "1/top"]
    program, suites = read_bundle(artifacts / "model.bpte", (artifacts / "model.bpte").read_bytes())
    assert program.tobytes() == (artifacts / "model.pte").read_bytes()
    (x, ids), (logits, top) = suites["forward"][1]
    np.testing.assert_array_equal(ids, _feeds()[1]["ids"])
    assert (x.dtype, ids.dtype, logits.shape, top.dtype) == (np.float32, np.int64, (2, 4), np.int64)


def test_pte_tampered_expected_output_fails(artifacts: Path):
    from stages.formats import backend

    run = backend("pte").load(artifacts / "model.pte", IO)
    expected = [run(feed) for feed in _feeds()]
    expected[1][0] = expected[1][0] + 0.5
    _write(artifacts / "model.pte", expected)
    result = check(artifacts / "model.bpte")
    assert result["reason"].startswith("case 1 output 'logits' max abs 0.5 > 0.0001"), result["reason"]


def test_pte_rebuilt_after_bundling_fails(artifacts: Path):
    pte = artifacts / "model.pte"
    pte.write_bytes(pte.read_bytes() + b"\0")
    result = check(pte)
    assert not result["passed"] and "model.bpte holds another program than model.pte" in result["reason"]


def test_stateful_pte_bundles_one_call_from_the_initial_state(tmp_path: Path):
    from executorch.runtime import Runtime

    from tests.tiny_stateful import FEATURES, TinyStream

    torch.manual_seed(0)
    model = TinyStream().eval()
    model.memory.previous.fill_(0.25)
    artifact = tmp_path / "model.pte"
    artifact.write_bytes(_lower(model, (torch.zeros(1, FEATURES),)))
    io = {"inputs": [{"name": "x", "shape": [1, FEATURES], "dtype": "float32", "dynamic": {}}],
          "outputs": ["logits"], "state": [], "internal_state": ["memory.previous", "memory.total"]}
    feeds = [{"x": np.full((1, FEATURES), v, np.float32)} for v in (1.0, 2.0)]
    method = Runtime.get().load_program(artifact).load_method("forward")
    expected = [[method.execute([torch.from_numpy(f["x"])])[0].numpy()] for f in feeds]  # a stream
    with torch.no_grad():
        eager = [[model(torch.from_numpy(f["x"])).numpy()] for f in feeds]
    write(artifact, io, feeds, expected, eager, TOLERANCE, {"precision": "fp32"})
    meta = json.loads((tmp_path / "model.bpte.json").read_text())
    assert meta["cases"] == 1 and "first call after loading" in meta["state"]
    result = check(artifact)
    assert result["passed"] and len(result["cases"]) == 1, result["reason"]


def test_cli_reports_each_artifact_on_one_line(artifacts: Path, capsys):
    assert main([str(artifacts)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" (")[0] for line in lines] == [f"PASS {artifacts / 'model.onnx'}",
                                                       f"PASS {artifacts / 'model.pte'}"]
    assert "2 cases, worst max abs" in lines[0]
    (artifacts / "model.onnx").write_bytes(b"not a model")
    assert main([str(artifacts / "model.onnx")]) == 1
    assert capsys.readouterr().out.startswith(f"FAIL {artifacts / 'model.onnx'}: onnxruntime cannot load it: ")


def test_cli_names_what_is_missing(built: Path, tmp_path: Path, capsys):
    shutil.copy(built / "model.onnx", tmp_path / "model.onnx")
    shutil.copy(built / "model.pte", tmp_path / "model.pte")
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path), str(tmp_path / "empty"), str(tmp_path / "absent.onnx")]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"ERROR {tmp_path / 'model.onnx'}: no test cases beside it (test_data_set_0/ missing)",
        f"ERROR {tmp_path / 'model.pte'}: no test cases beside it (model.bpte missing)",
        f"ERROR {tmp_path / 'empty'}: no .onnx, .pte or .bpte artifact in it",
        f"ERROR {tmp_path / 'absent.onnx'}: no such file"]


def test_cli_module_exits_1_without_traceback(built: Path, tmp_path: Path):
    shutil.copy(built / "model.onnx", tmp_path / "model.onnx")
    done = subprocess.run([sys.executable, "-m", "pipelines.check_artifact", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    missing = "no test cases beside it (test_data_set_0/ missing)"
    assert done.stdout == f"ERROR {tmp_path / 'model.onnx'}: {missing}\n"


def test_a_program_past_the_bundle_limit_verifies_and_says_why_it_has_no_bundle(run_tiny, monkeypatch,
                                                                                   in_process):
    """A 1B-parameter .pte (4 GB) cannot go into a BundledProgram (one flatbuffer, at most 2 GB):
    verify still judges it, and says why no model.bpte is written (shown with the limit lowered)."""
    from stages.support import testcases

    monkeypatch.setattr(testcases, "BUNDLE_LIMIT", 1024)
    run = run_tiny("format=pte", "precision=fp32")
    assert run.status == "pass", run.error
    cases = run.result("verify")["test_cases"]
    assert cases["cases"] == 0 and "2 GiB" in cases["skipped"]
    assert not list(run.outputs["verify"].dir.glob("*.bpte"))
