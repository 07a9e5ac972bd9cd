"""Checkpoints that carry their own graph (TorchScript .pt/.ptl, .pt2) with no class and no model
entry: `model=graph`, TorchScript converted by torch's TS2EPConverter."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from pipelines.errors import PipelineError
from stages.support.checkpoint_formats import load_checkpoint_file
from stages.support.graph_files import graph_part, torchscript_program
from tests.conftest import ROOT


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.left, self.right = nn.Linear(6, 8), nn.Linear(8, 3), nn.Linear(8, 2)

    def forward(self, features):
        hidden = torch.relu(self.body(features))
        return self.left(hidden), self.right(hidden)


class Counting(nn.Module):
    """Writes an attribute inside an `if`: a node TorchScript's converter does not take."""

    def __init__(self):
        super().__init__()
        self.lin, self.calls = nn.Linear(4, 4), 0

    def forward(self, x):
        if x.sum() > 0:
            self.calls = self.calls + 1
        return self.lin(x)


class Stateful(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder, self.cell = nn.Linear(4, 4), Counting()

    def forward(self, x):
        return self.cell(self.encoder(x))


@pytest.fixture(scope="module")
def scripted_files(tmp_path_factory):
    torch.manual_seed(0)
    folder, model = tmp_path_factory.mktemp("graphs"), TwoHeads().eval()
    torch.jit.script(model).save(str(folder / "scripted.pt"))
    torch.jit.trace(model, torch.rand(1, 6)).save(str(folder / "traced.pt"))
    torch.jit.script(model)._save_for_lite_interpreter(str(folder / "lite.ptl"))
    return folder, model


@pytest.mark.parametrize("name", ["scripted.pt", "traced.pt", "lite.ptl"])
def test_a_torchscript_file_becomes_a_part_and_a_program_that_computes_as_the_module(scripted_files, name):
    folder, model = scripted_files
    path = folder / name
    part = graph_part({"checkpoint": str(path), "inputs": [[1, 6]]})
    assert part["name"] == path.stem and part["outputs"] == ["output_0", "output_1"]
    assert [(s["name"], s["shape"], s["dtype"]) for s in part["inputs"]] == [("features", [1, 6], "float32")]
    program = torchscript_program(load_checkpoint_file(path), [[1, 6]], name)
    x = torch.rand(1, 6)
    for got, want in zip(program.module()(x), model(x)):
        torch.testing.assert_close(got, want)


def test_a_node_the_converter_cannot_take_is_named_with_its_line_and_submodule(tmp_path):
    torch.jit.script(Stateful()).save(str(tmp_path / "stateful.pt"))
    with pytest.raises(PipelineError) as error:
        torchscript_program(load_checkpoint_file(tmp_path / "stateful.pt"), [[1, 4]], "stateful.pt")
    message = str(error.value)
    assert "prim::If" in message and "if x.sum() > 0:" in message and "test_graph_files.py" in message
    assert "in submodule 'cell'" in message and "holding none of these nodes: encoder" in message


def test_torchscript_without_shapes_asks_for_them(scripted_files):
    folder, _ = scripted_files
    with pytest.raises(PipelineError, match=r"records no input shapes \(inputs features\)") as error:
        graph_part({"checkpoint": str(folder / "scripted.pt"), "inputs": None})
    assert "model.inputs=[[1,1,750]]" in error.value.fix
    with pytest.raises(PipelineError, match=r"gives 2 input\(s\), but scripted.pt's forward takes 1"):
        graph_part({"checkpoint": str(folder / "scripted.pt"), "inputs": [[1, 6], [1, 6]]})


def test_a_pt2_records_its_own_shapes_and_bounded_dynamic_dims(tmp_path):
    batch = torch.export.Dim("batch", max=64)
    program = torch.export.export(TwoHeads().eval(), (torch.rand(2, 6),), dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp_path / "heads.pt2")
    part = graph_part({"checkpoint": str(tmp_path / "heads.pt2"), "inputs": None})
    assert [(s["name"], s["shape"], s["dynamic"], s["max"]) for s in part["inputs"]] == [
        ("features", [2, 6], {0: "batch"}, 64)]
    assert part["outputs"] == ["output_0", "output_1"]
    unbounded = torch.export.export(TwoHeads().eval(), (torch.rand(2, 6),),
                                    dynamic_shapes=({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},))
    torch.export.save(unbounded, tmp_path / "auto.pt2")  # as TS2EPConverter exports: no bound to plan for
    assert graph_part({"checkpoint": str(tmp_path / "auto.pt2"), "inputs": None})["inputs"][0]["dynamic"] == {}


def _digits_script(tmp_path, how: str):
    """The zoo's trained digits CNN, scripted (.pt) or saved for the lite interpreter (.ptl),
    and its training split as the examples a user has (.npz)."""
    from models.digits import train_split
    from stages.support.model_builder import build_model

    checkpoint = ROOT / "checkpoints" / "digits_cnn.pt"
    if not checkpoint.exists():
        from models.digits import make_checkpoint

        make_checkpoint(checkpoint)
    from omegaconf import OmegaConf

    entry = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / "digits_cnn.yaml"))
    model = build_model(entry, None)
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["model_state_dict"])
    script = torch.jit.script(model.eval())
    path = tmp_path / f"digits.{how}"
    (script._save_for_lite_interpreter if how == "ptl" else script.save)(str(path))
    np.savez(tmp_path / "calib.npz", image=train_split(samples=128, seed=0)["image"])
    return path


@pytest.mark.parametrize("how, cells", [
    ("ptl", "precision=fp32,fp16,int8 format=onnx,pte"),
    pytest.param("pt", "precision=fp32,fp16,int8 format=onnx,pte", marks=pytest.mark.slow)])
def test_a_scripted_zoo_model_goes_to_every_cell_with_no_model_entry(tmp_path, how, cells):
    path = _digits_script(tmp_path, how)
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, "run.py", "-m", "model=graph", f"model.checkpoint={path}",
         "model.inputs=[{shape: [1,1,8,8], low: 0, high: 1, dynamic: {0: batch}}]", *cells.split(),
         "calibration=files", f"calibration.files=[{tmp_path / 'calib.npz'}]", "verify.emulate=false",
         f"cache.dir={tmp_path}/cache", f"hydra.sweep.dir={sweep}"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert (sweep / "matrix.json").exists(), result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads((sweep / "matrix.json").read_text())
    assert {(r["precision"], r["format"]) for r in rows} == {(p, f) for p in ("fp32", "fp16", "int8")
                                                             for f in ("onnx", "pte")}
    assert all(r["status"] == "pass" for r in rows), [(r["precision"], r["format"], r["error"]) for r in rows]
    verify = json.loads((sweep / "graph_fp32_pte" / "artifacts" / "digits" / "verify.json").read_text())
    assert verify["passed"] and verify["outputs"]["output"]["max_abs"] < 1e-4
