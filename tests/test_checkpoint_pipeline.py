"""Every checkpoint shape load_checkpoint accepts runs through the whole chain to a verified artifact."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.tiny import TinyNet


@pytest.fixture(scope="module")
def net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().eval()


def nemo(path: Path, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (("model_config.yaml", b"features: 16\n"), ("model_weights.ckpt", buffer.getvalue())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def unknown_layout(net, path: Path) -> None:
    """A training run's own layout: the weights two levels down under a key no rule knows, beside
    a teacher with more tensors (of another shape) and an optimizer's state."""
    optimizer = torch.optim.Adam(net.parameters())
    net(torch.randn(2, 16)).sum().backward()
    optimizer.step()
    teacher = {f"{k}.teacher": torch.zeros(3, *v.shape) for k, v in net.state_dict().items()}
    torch.save({"step": 100, "run": {"nets": {"student": net.state_dict(), "teacher": {**teacher, "extra": torch.ones(1)}}},
                "optimizer_state": optimizer.state_dict()}, path)


WRITERS = {
    "state_dict": lambda net, path: torch.save(net.state_dict(), path),
    "legacy_pickle": lambda net, path: torch.save(net.state_dict(), path, _use_new_zipfile_serialization=False),
    "lightning": lambda net, path: torch.save({"state_dict": {f"model.{k}": v for k, v in net.state_dict().items()},
                                               "hyper_parameters": {"features": 16},
                                               "pytorch-lightning_version": "2.4.0"}, path),
    "compiled_ddp": lambda net, path: torch.save({"model": {f"module._orig_mod.{k}": v
                                                            for k, v in net.state_dict().items()}}, path),
    "safetensors": lambda net, path: save_file(net.state_dict(), path,
                                               metadata={"config": json.dumps({"features": 16})}),
    "nemo": lambda net, path: nemo(path, net.state_dict()),
    "torchscript": lambda net, path: torch.jit.save(torch.jit.script(net), path),
    "unknown_layout": unknown_layout,
}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("shape", WRITERS)
def test_weights_of_every_shape_go_through_the_chain(shape, net, tmp_path, run_tiny):
    path = tmp_path / f"tiny.{shape}"
    WRITERS[shape](net, path)
    run = run_tiny(checkpoint=path)
    assert run.status == "pass", run.error
    assert run.result("verify")["outputs"]["logits"]["max_abs"] <= 1e-5
    assert run.result("clean_state_dict")["matched"] == 4
    if shape == "unknown_layout":
        report = json.loads((run.outputs["clean_state_dict"].dir / "key_report.json").read_text())
        assert report["weights"]["path"] == "run.nets.student"
        assert {c["path"]: c["fits"] for c in report["weights"]["candidates"]} == {
            "run.nets.student": 4, "run.nets.teacher": 0}


def test_weights_key_names_the_entry_by_hand(net, tmp_path, run_tiny):
    path = tmp_path / "tiny.pt"
    unknown_layout(net, path)
    run = run_tiny("model.weights_key=run.nets.teacher", checkpoint=path)
    assert run.status == "fail" and "0/4 expected keys found" in run.error
    run = run_tiny("model.weights_key=run.nets.student", checkpoint=path)
    assert run.status == "pass", run.error
    assert run.result("load_checkpoint")["weights_path"] == "run.nets.student"


@pytest.mark.parametrize("fmt", ["onnx", "pte"])
def test_an_exported_program_is_the_model_itself(fmt, net, tmp_path, run_tiny):
    """A .pt2 needs no arch: wrap re-exports the program, verify runs program.module() as eager."""
    path = tmp_path / "tiny.pt2"
    batch = torch.export.Dim("batch", max=64)
    torch.export.save(torch.export.export(net, (torch.randn(2, 16),), dynamic_shapes=({0: batch},)), path)
    run = run_tiny(f"format={fmt}", checkpoint=path, model="tiny_program")
    assert run.status == "pass", run.error
    assert run.result("load_checkpoint")["kind"] == "exported_program"
    assert run.result("clean_state_dict")["weights"] == "program.pt2"
    assert run.result("verify")["outputs"]["logits"]["max_abs"] <= 1e-5
