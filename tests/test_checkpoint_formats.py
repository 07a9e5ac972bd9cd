"""Format detection, weight extraction and error messages of stages.support.checkpoint_formats."""
from __future__ import annotations

import dataclasses
import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch import nn

from pipelines.errors import PipelineError
from stages.support.checkpoint_formats import load_checkpoint_file


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


@dataclasses.dataclass
class Recipe:
    width: int = 3
    depth: int = 1


CONFIG = {"width": 3, "depth": 1, "name": "tiny"}


@pytest.fixture(scope="module")
def net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.fixture(scope="module")
def sd(net: TinyNet) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


def assert_same(loaded: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert list(loaded) == list(reference)
    for key, value in reference.items():
        assert torch.equal(loaded[key], value), key


def error_of(path: Path, **kwargs) -> PipelineError:
    with pytest.raises(PipelineError) as info:
        load_checkpoint_file(path, **kwargs)
    return info.value


def make_tar(path: Path, members: dict[str, bytes], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def saved_bytes(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# ---------------------------------------------------------------- torch.save dictionaries


def test_bare_state_dict(tmp_path, sd):
    torch.save(sd, tmp_path / "w.pt")
    loaded = load_checkpoint_file(tmp_path / "w.pt")
    assert loaded.kind == "state_dict"
    assert_same(loaded.state_dict, sd)
    assert loaded.config is None and loaded.ema_state_dict is None and loaded.program is None


def test_legacy_torch_save(tmp_path, sd):
    torch.save(sd, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    loaded = load_checkpoint_file(str(tmp_path / "old.pth"))
    assert loaded.kind == "state_dict"
    assert_same(loaded.state_dict, sd)


def test_training_dict_with_config(tmp_path, sd):
    ckpt = {"model_state_dict": sd, "config": CONFIG, "optimizer_state_dict": {"state": {}}, "epoch": 7}
    torch.save(ckpt, tmp_path / "train.pt")
    loaded = load_checkpoint_file(tmp_path / "train.pt")
    assert loaded.kind == "training_dict"
    assert_same(loaded.state_dict, sd)
    assert loaded.config == CONFIG
    notes = "\n".join(loaded.notes)
    assert "'model_state_dict'" in notes and "ignored: optimizer_state_dict, epoch" in notes


def test_training_dict_hparams_and_ema(tmp_path, sd):
    ema = {k: v + 1 for k, v in sd.items()}
    torch.save({"model": sd, "hparams": CONFIG, "model_ema": ema}, tmp_path / "hp.pt")
    loaded = load_checkpoint_file(tmp_path / "hp.pt")
    assert loaded.kind == "training_dict"
    assert loaded.config == CONFIG
    assert_same(loaded.ema_state_dict, ema)
    assert any("EMA weights: model_ema" in note for note in loaded.notes)


def test_lightning_checkpoint(tmp_path, sd):
    prefixed = {f"model.{k}": v for k, v in sd.items()}
    ckpt = {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": prefixed,
        "hyper_parameters": CONFIG,
        "optimizer_states": [{"state": {}}],
        "lr_schedulers": [],
        "callbacks": {"EMACallback": {"ema_state_dict": prefixed}},
    }
    torch.save(ckpt, tmp_path / "last.ckpt")
    loaded = load_checkpoint_file(tmp_path / "last.ckpt")
    assert loaded.kind == "lightning"
    assert_same(loaded.state_dict, prefixed)  # prefixes are cleaned elsewhere
    assert loaded.config == CONFIG
    assert_same(loaded.ema_state_dict, prefixed)
    assert any("optimizer_states" in note and note.startswith("ignored") for note in loaded.notes)


# ---------------------------------------------------------------- other containers


@pytest.mark.parametrize(("prefix", "mode"), [("./", "w"), ("", "w:gz")])
def test_nemo_archive(tmp_path, sd, prefix, mode):
    members = {f"{prefix}model_config.yaml": b"width: 3\nname: tiny\n", f"{prefix}model_weights.ckpt": saved_bytes(sd)}
    path = make_tar(tmp_path / "asr.nemo", members, mode)
    loaded = load_checkpoint_file(path)
    assert loaded.kind == "nemo"
    assert_same(loaded.state_dict, sd)
    assert loaded.config == {"width": 3, "name": "tiny"}


def test_safetensors_with_config(tmp_path, sd):
    save_file(sd, tmp_path / "model.safetensors", metadata={"config": json.dumps(CONFIG), "format": "pt"})
    loaded = load_checkpoint_file(tmp_path / "model.safetensors")
    assert loaded.kind == "safetensors"
    assert_same(dict(sorted(loaded.state_dict.items())), dict(sorted(sd.items())))
    assert loaded.config == CONFIG
    assert any("format" in note for note in loaded.notes)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("name", ["scripted.pt", "scripted.ptl"])
def test_torchscript(tmp_path, net, sd, name):
    torch.jit.save(torch.jit.script(net), tmp_path / name)
    loaded = load_checkpoint_file(tmp_path / name)
    assert loaded.kind == "torchscript"
    assert_same(loaded.state_dict, sd)
    assert isinstance(loaded.script, torch.jit.ScriptModule)  # its graph, for model=graph


def test_exported_program(tmp_path, net, sd):
    torch.export.save(torch.export.export(net, (torch.randn(2, 4),)), tmp_path / "net.pt2")
    loaded = load_checkpoint_file(tmp_path / "net.pt2")
    assert loaded.kind == "exported_program"
    assert isinstance(loaded.program, torch.export.ExportedProgram)
    assert_same(loaded.state_dict, sd)


def test_safetensors_with_unreadable_config(tmp_path, sd):
    save_file(sd, tmp_path / "m.safetensors", metadata={"config": "width=3"})
    loaded = load_checkpoint_file(tmp_path / "m.safetensors")
    assert loaded.config is None and "metadata 'config' is not valid JSON; ignored" in loaded.notes


def test_content_beats_extension(tmp_path, sd):
    save_file(sd, tmp_path / "liar.pt")
    torch.save(sd, tmp_path / "pytorch_model.bin")
    assert load_checkpoint_file(tmp_path / "liar.pt").kind == "safetensors"
    assert load_checkpoint_file(tmp_path / "pytorch_model.bin").kind == "state_dict"


# ---------------------------------------------------------------- pickled classes


def test_custom_class_refused_then_allowed(tmp_path, sd):
    path = tmp_path / "custom.pt"
    torch.save({"model_state_dict": sd, "config": Recipe(width=5)}, path)
    err = error_of(path)
    assert str(path) in err.message and "Recipe" in err.message
    assert "model.allow_pickle=true" in err.fix and "execute" in err.fix
    loaded = load_checkpoint_file(path, allow_pickle=True)
    assert loaded.config == {"width": 5, "depth": 1}
    assert_same(loaded.state_dict, sd)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("protocol", [2, 4])
def test_every_refused_class_is_named(tmp_path, net, sd, protocol):
    path = tmp_path / "module.pt"
    torch.save({"model": net, "config": Recipe()}, path, pickle_protocol=protocol)
    message = error_of(path).message
    for name in ("TinyNet", "Recipe", "torch.nn.modules.linear.Linear", "torch.nn.modules.batchnorm.BatchNorm1d"):
        assert name in message
    assert "builtins" not in message and "_rebuild" not in message
    loaded = load_checkpoint_file(path, allow_pickle=True)
    assert loaded.kind == "training_dict"
    assert_same(loaded.state_dict, sd)


def test_omegaconf_config_needs_pickle_and_becomes_plain(tmp_path, sd):
    config = OmegaConf.create({"encoder": {"width": "${width}"}, "width": 8})
    ckpt = {"pytorch-lightning_version": "2.4.0", "state_dict": sd, "hyper_parameters": config}
    torch.save(ckpt, tmp_path / "oc.ckpt")
    assert "omegaconf.dictconfig.DictConfig" in error_of(tmp_path / "oc.ckpt").message
    loaded = load_checkpoint_file(tmp_path / "oc.ckpt", allow_pickle=True)
    assert loaded.kind == "lightning"
    assert loaded.config == {"encoder": {"width": 8}, "width": 8}
    assert type(loaded.config["encoder"]) is dict


def test_pickled_module_at_top_level(tmp_path, net, sd):
    torch.save(net, tmp_path / "whole.pt")
    assert "TinyNet" in error_of(tmp_path / "whole.pt").message
    loaded = load_checkpoint_file(tmp_path / "whole.pt", allow_pickle=True)
    assert_same(loaded.state_dict, sd)


def test_exported_program_with_pickled_payload_is_refused(tmp_path, net):
    clean = tmp_path / "clean.pt2"
    torch.export.save(torch.export.export(net, (torch.randn(2, 4),)), clean)
    tampered = tmp_path / "tampered.pt2"
    with zipfile.ZipFile(clean) as src, zipfile.ZipFile(tampered, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if "sample_inputs" in item.filename:
                data = saved_bytes(((Recipe(),), {}))
            dst.writestr(item, data)
    err = error_of(tampered)
    assert "Recipe" in err.message and "model.allow_pickle=true" in err.fix


# ---------------------------------------------------------------- bad files


def test_missing_file_suggests_close_names(tmp_path, sd):
    torch.save(sd, tmp_path / "model_best.pt")
    err = error_of(tmp_path / "model_bset.pt")
    assert str(tmp_path / "model_bset.pt") in err.message and "does not exist" in err.message
    assert "model_best.pt" in err.fix and "model.checkpoint=" in err.fix


def test_missing_directory(tmp_path):
    err = error_of(tmp_path / "nowhere" / "w.pt")
    assert "does not exist" in err.message and "nowhere" in err.fix


def test_directory(tmp_path, sd):
    save_file(sd, tmp_path / "model.safetensors")
    err = error_of(tmp_path)
    assert "is a directory" in err.message and "model.safetensors" in err.fix


def test_empty_file(tmp_path):
    (tmp_path / "empty.pt").touch()
    err = error_of(tmp_path / "empty.pt")
    assert "empty.pt is empty (0 bytes)" in err.message


def test_truncated_zip(tmp_path, sd):
    data = saved_bytes(sd)
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    err = error_of(tmp_path / "cut.pt")
    assert "cut.pt is a truncated or corrupt zip archive" in err.message and "again" in err.fix


@pytest.mark.parametrize("keep", [20, -10])
def test_truncated_safetensors(tmp_path, sd, keep):
    save_file(sd, tmp_path / "full.safetensors")
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:keep])
    err = error_of(tmp_path / "cut.safetensors")
    assert "cut.safetensors is truncated" in err.message


@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_truncated_tar(tmp_path, sd, mode):
    members = {"model_config.yaml": b"width: 3\n", "model_weights.ckpt": saved_bytes({"w": torch.randn(64, 64)})}
    data = make_tar(tmp_path / "full.nemo", members, mode).read_bytes()
    (tmp_path / "cut.nemo").write_bytes(data[: len(data) // 2])
    err = error_of(tmp_path / "cut.nemo")
    assert "cut.nemo is a truncated or corrupt tar archive" in err.message


def test_tar_without_nemo_weights(tmp_path):
    path = make_tar(tmp_path / "other.nemo", {"readme.txt": b"hi"})
    err = error_of(path)
    assert "has no regular file model_weights.ckpt" in err.message and "readme.txt" in err.message


def test_random_bytes(tmp_path):
    (tmp_path / "noise.pt").write_bytes(bytes(range(7, 256)) * 8)
    err = error_of(tmp_path / "noise.pt")
    assert "noise.pt is not in a known format" in err.message
    assert "safetensors" in err.fix and "NeMo" in err.fix and ".pt2" in err.fix


def test_git_lfs_pointer(tmp_path):
    pointer = b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n"
    (tmp_path / "lfs.pt").write_bytes(pointer)
    assert "git lfs pull" in error_of(tmp_path / "lfs.pt").fix


def test_zip_that_is_not_a_checkpoint(tmp_path):
    with zipfile.ZipFile(tmp_path / "data.pt", "w") as zf:
        zf.writestr("notes.txt", "hello")
    assert "zip archive but not a PyTorch checkpoint" in error_of(tmp_path / "data.pt").message


@pytest.mark.parametrize(("obj", "text"), [([1, 2, 3], "holds a list"), (torch.ones(3), "single tensor")])
def test_pickle_of_wrong_type(tmp_path, obj, text):
    torch.save(obj, tmp_path / "odd.pt")
    err = error_of(tmp_path / "odd.pt")
    assert "odd.pt" in err.message and text in err.message and "state_dict()" in err.fix


def test_dict_without_weights(tmp_path):
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "opt.pt")
    err = error_of(tmp_path / "opt.pt")
    assert "opt.pt has no recognizable weights (top-level keys: epoch, optimizer)" in err.message
    assert "model_state_dict" in err.fix and "model.weights_key=" in err.fix


def test_weights_found_by_content_under_unknown_keys(tmp_path, sd):
    """No known key: the only nested dict of tensors is taken; an optimizer's per-parameter
    state (keyed by integers) is not mistaken for weights."""
    optimizer = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 0.1}]}
    torch.save({"step": 3, "train": {"model_state": sd}, "optimizer_state": optimizer}, tmp_path / "run.pt")
    loaded = load_checkpoint_file(tmp_path / "run.pt")
    assert_same(loaded.state_dict, sd)
    assert loaded.weights_path == "train.model_state" and not loaded.candidates
    assert "ignored: step, optimizer_state" in " ".join(loaded.notes)


def test_several_candidates_are_left_for_the_architecture_to_choose(tmp_path, sd):
    torch.save({"a": {"student": sd}, "b": {"teacher": {"w": torch.ones(2)}}}, tmp_path / "two.pt")
    loaded = load_checkpoint_file(tmp_path / "two.pt")
    assert set(loaded.candidates) == {"a.student", "b.teacher"}


def test_weights_key_picks_a_nested_entry_and_names_what_is_there(tmp_path, sd):
    torch.save({"a": {"student": sd}, "b": {"teacher": {"w": torch.ones(2)}}}, tmp_path / "two.pt")
    loaded = load_checkpoint_file(tmp_path / "two.pt", weights_key="a.student")
    assert_same(loaded.state_dict, sd)
    assert loaded.weights_path == "a.student"
    err = error_of(tmp_path / "two.pt", weights_key="a.teacher")
    assert "has no key 'teacher' at 'a' (keys: student)" in err.message
    assert "a.student (7)" in err.fix and "b.teacher (1)" in err.fix
    save_file(sd, tmp_path / "w.safetensors")
    assert "remove model.weights_key" in error_of(tmp_path / "w.safetensors", weights_key="x").fix


@pytest.mark.parametrize("wrap", [False, True])
def test_non_tensor_values(tmp_path, sd, wrap):
    weights = {**sd, "step": 5}
    torch.save({"state_dict": weights} if wrap else weights, tmp_path / "mixed.pt")
    err = error_of(tmp_path / "mixed.pt")
    assert "mixed.pt" in err.message and "non-tensor values" in err.message and "step (int)" in err.message
