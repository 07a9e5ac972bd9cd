"""Stateful parts: buffers that forward updates become state inputs/outputs in ONNX (and stay
inside a .pte), and verification streams chunks with the state carried, as an app does."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, compose_config, NATIVE_ONLY
from tests.tiny_stateful import FEATURES, TinyStream, write_checkpoint

STATE_INPUTS = ["state_in_memory_previous", "state_in_memory_total"]
STATE_OUTPUTS = ["state_out_memory_previous", "state_out_memory_total"]
BUFFERS = ["model.memory.previous", "model.memory.total"]  # as the exported part names them
# ExecuTorch warns about every mutable buffer, also the ones lower serializes with their values
pytestmark = pytest.mark.filterwarnings("ignore:Mutation on a buffer:UserWarning")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("stateful") / "tiny_stream.pt")


@pytest.fixture(scope="module")
def run_stream(checkpoint: Path):
    """Run the chain on the tiny streaming model in-process (one cache for the module);
    returns the PartRun and its artifacts directory."""
    import stages  # noqa: F401  registers the stages
    from pipelines.runner import Runner

    runs = iter(range(1000))

    def run(*overrides: str):
        cfg = compose_config("model=tiny_stream", f"model.checkpoint={checkpoint}",
                             f"cache.dir={checkpoint.parent / 'cache'}", "calibration=synthetic",
                             *overrides)
        run_dir = checkpoint.parent / f"run{next(runs)}"
        run_dir.mkdir()
        part = Runner(cfg, run_dir, logging.getLogger("test")).run()[0]
        return part, run_dir / "artifacts" / part.part

    return run


def eager_model(checkpoint: Path) -> TinyStream:
    model = TinyStream()
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["model_state_dict"])
    return model.eval()


def test_onnx_takes_the_state_as_io_and_matches_eager_on_every_chunk(run_stream):
    run, _ = run_stream("format=onnx")
    assert run.status == "pass", run.error
    stream = run.result("verify")["stream"]
    assert stream["chunks"] >= 20 and len(stream["per_chunk_max_abs"]) == stream["chunks"]
    assert max(stream["per_chunk_max_abs"]) <= 1e-5
    assert stream["state"] == STATE_INPUTS
    # what an export that drops the state gives: right on the first chunk only, then far off
    baseline = stream["stateless_baseline"]
    assert baseline["per_chunk_max_abs"][0] <= 1e-5 and baseline["max_abs"] > 0.1


def test_state_json_names_the_state_and_an_app_can_carry_it(run_stream, checkpoint):
    import onnxruntime as ort

    _, artifacts = run_stream("format=onnx")
    state = json.loads((artifacts / "state.json").read_text())
    assert [s["input"] for s in state] == STATE_INPUTS
    assert [s["output"] for s in state] == STATE_OUTPUTS
    assert [s["shape"] for s in state] == [[1, FEATURES]] * 2 and state[0]["dtype"] == "float32"
    assert state[0]["initial"] == [[0.25] * FEATURES] and state[1]["initial"] == "zeros"
    session = ort.InferenceSession(str(artifacts / "model.onnx"), providers=["CPUExecutionProvider"])
    assert json.loads(session.get_modelmeta().custom_metadata_map["io"])["state"] == state

    names = [o.name for o in session.get_outputs()]
    carried = {s["input"]: np.zeros(s["shape"], np.float32) if s["initial"] == "zeros"
               else np.array(s["initial"], np.float32) for s in state}
    eager, rng = eager_model(checkpoint), np.random.default_rng(0)
    for _ in range(20):
        x = rng.standard_normal((1, FEATURES)).astype(np.float32)
        outputs = dict(zip(names, session.run(None, {"x": x, **carried})))
        carried = {s["input"]: outputs[s["output"]] for s in state}
        with torch.no_grad():
            assert np.abs(outputs["logits"] - eager(torch.from_numpy(x)).numpy()).max() <= 1e-5


def test_onnx_with_the_state_dropped_is_refused(run_stream):
    run, _ = run_stream("format=onnx", "wrap.state=internal")
    assert run.status == "fail"
    assert "[convert]" in run.error and "silently wrong" in run.error
    assert "fix: use wrap.state=io" in run.error


def test_a_forward_that_assigns_its_buffers_is_refused(run_stream):
    run, _ = run_stream("model.arch._target_=tests.tiny_stateful.RebindingStream")
    assert run.status == "fail" and "[wrap]" in run.error
    assert "assigns new tensors to buffers ['memory.previous', 'memory.total']" in run.error


def test_verify_fails_an_artifact_that_drops_the_state(run_stream, checkpoint):
    from stages.formats import onnx
    from stages.support.model_builder import PartModule, as_step
    from stages.support.streaming import initial_state, verify_stream
    from stages.verify import _resetter

    run, artifacts = run_stream("format=onnx")
    io = json.loads((artifacts / "io.json").read_text())
    eager_io = json.loads((run.outputs["wrap"].dir / "io.json").read_text())
    artifact = onnx.load(artifacts / "model.onnx", io)
    module = PartModule(eager_model(checkpoint), {"name": "step", "inputs": eager_io["inputs"]})
    cfg = compose_config("model=tiny_stream")
    report = verify_stream(cfg.verify.stream, cfg.precision.tolerance, as_step(module, eager_io["inputs"]),
                           eager_io, _resetter(module, eager_io),
                           lambda feed: artifact({**feed, **initial_state(io)}), io)
    assert not report["passed"]
    assert report["reason"].startswith(f"streaming chunk 1/{cfg.verify.stream.chunks}: output 'logits'")


def test_stream_signals_continue_from_chunk_to_chunk(tmp_path):
    from pipelines.errors import PipelineError
    from stages.support.streaming import signal_chunks

    cfg = compose_config("model=tiny_stream").verify.stream
    specs = [{"name": "x", "shape": [1, 4], "dtype": "float32"},
             {"name": "token", "shape": [1], "dtype": "int64", "low": 0, "high": 9}]
    chunks = signal_chunks(cfg, specs)
    t = np.arange(cfg.chunks * 4)
    sine = cfg.amplitude * np.sin(2 * np.pi * cfg.frequency_hz * t / cfg.sample_rate)
    assert np.allclose(np.concatenate([c["x"][0] for c in chunks]), sine, atol=1e-7)
    assert all(c["token"].dtype == np.int64 and 0 <= c["token"][0] <= 9 for c in chunks)

    np.save(tmp_path / "signal.npy", np.arange(200, dtype=np.float32))
    cfg.signal, cfg.file = "file", str(tmp_path / "signal.npy")
    assert signal_chunks(cfg, specs[:1])[1]["x"].tolist() == [[4.0, 5.0, 6.0, 7.0]]
    cfg.chunks = 51
    with pytest.raises(PipelineError, match="holds 200 samples; 51 chunks need 204"):
        signal_chunks(cfg, specs[:1])


def test_pte_keeps_the_state_inside_and_matches_eager_on_every_chunk(run_stream):
    run, artifacts = run_stream("format=pte")
    assert run.status == "pass", run.error
    io = json.loads((artifacts / "io.json").read_text())
    assert io["state"] == [] and io["internal_state"] == BUFFERS
    assert not (artifacts / "state.json").exists()
    stream = run.result("verify")["stream"]
    assert max(stream["per_chunk_max_abs"]) <= 1e-5 and "inside the artifact" in stream["state"]
    assert stream["stateless_baseline"]["max_abs"] > 0.1


def test_pte_takes_the_state_as_io_on_request_and_wrap_is_shared_by_the_formats(run_stream):
    run, artifacts = run_stream("format=pte", "wrap.state=io")
    assert run.status == "pass", run.error
    assert [s["input"] for s in json.loads((artifacts / "state.json").read_text())] == STATE_INPUTS
    assert max(run.result("verify")["stream"]["per_chunk_max_abs"]) <= 1e-5
    onnx_run, _ = run_stream("format=onnx")
    assert onnx_run.outputs["wrap"].key == run.outputs["wrap"].key
    assert next(r for r in onnx_run.records if r.stage == "wrap").hit


def test_int8_onnx_keeps_the_state_in_float(run_stream):
    import onnx

    run, artifacts = run_stream("format=onnx", "precision=int8")
    assert run.status == "pass", run.error
    graph = onnx.load(str(artifacts / "model.onnx")).graph
    assert {i.name: i.type.tensor_type.elem_type for i in graph.input} == \
        {"x": onnx.TensorProto.FLOAT, **{name: onnx.TensorProto.FLOAT for name in STATE_INPUTS}}
    readers = [n.op_type for n in graph.node if set(n.input) & set(STATE_INPUTS)]
    assert readers and "QuantizeLinear" not in readers
    assert run.result("size_audit")["passed"]


def test_streaming_pitch_end_to_end_onnx(tmp_path):
    """The zoo entry through `python run.py`, on seeded untrained weights (no training run)."""
    from models.streaming_pitch import StreamingPitch

    torch.manual_seed(0)
    model = StreamingPitch()
    checkpoint = tmp_path / "pitch.pt"
    torch.save({"model_state_dict": model.state_dict(), "config": {}}, checkpoint)
    result = subprocess.run(
        [sys.executable, "run.py", "model=streaming_pitch", NATIVE_ONLY, f"model.checkpoint={checkpoint}",
         f"cache.dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    part = json.loads((tmp_path / "run" / "report.json").read_text())["parts"][0]
    stream = part["verify"]["stream"]
    assert part["status"] == "pass" and stream["chunks"] == 24 and stream["max_abs"] <= 1e-4
    assert stream["stateless_baseline"]["max_abs"] > 100 * stream["max_abs"]
    state = json.loads((tmp_path / "run" / "artifacts" / "pitch" / "state.json").read_text())
    assert [s["input"] for s in state] == [f"state_in_convs_{i}_cache" for i in range(5)]


class _Counter(torch.nn.Module):
    def __init__(self, inplace_relu: bool, update: bool):
        super().__init__()
        self.register_buffer("seen", torch.zeros(3))
        self.fc, self.relu, self.update = torch.nn.Linear(3, 3), torch.nn.ReLU(inplace=inplace_relu), update

    def forward(self, x):
        if self.update:
            self.seen.add_(x.sum(0))
        return self.relu(self.fc(x) + self.seen)


@pytest.mark.parametrize("inplace_relu, update, functionalized, found", [
    (False, False, False, []), (True, False, True, []), (False, True, True, ["seen"])])
def test_mutated_buffers_functionalizes_only_a_graph_that_can_write(monkeypatch, inplace_relu, update,
                                                                    functionalized, found):
    """The buffers a forward updates are found (an in-place add on one), an in-place ReLU on an
    activation is none of them, and a graph with no writing operator skips the decomposition."""
    from stages.support.state_io import mutated_buffers

    program = torch.export.export(_Counter(inplace_relu, update).eval(), (torch.randn(2, 3),), strict=False)
    calls = []
    decompose = torch.export.ExportedProgram.run_decompositions
    monkeypatch.setattr(torch.export.ExportedProgram, "run_decompositions",
                        lambda self, *a, **k: calls.append(1) or decompose(self, *a, **k))
    assert mutated_buffers(program) == found
    assert bool(calls) == functionalized
    assert mutated_buffers(program.run_decompositions({})) == found  # a functional graph: its signature
