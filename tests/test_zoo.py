"""Model zoo: deterministic checkpoints, weights_only loading, rebuild from config, torch.export, streaming."""
from __future__ import annotations

import copy
import json
import pathlib

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from models import biosignal, conformer_rnnt, kws, streaming_pitch

MODULES = {"kws": kws, "biosignal": biosignal, "conformer_rnnt": conformer_rnnt, "streaming_pitch": streaming_pitch}


def _config(name: str, ckpt: dict) -> dict:
    """The plain-dict config stored in a checkpoint (Lightning keeps it under ``hyper_parameters``)."""
    return ckpt["hyper_parameters"] if name == "biosignal" else ckpt["config"]


def _state_dict(name: str, ckpt: dict) -> dict[str, torch.Tensor]:
    """The model's own state dict: Lightning ``model.`` and torch.compile ``_orig_mod.`` prefixes removed."""
    if name == "biosignal":
        return {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    return {k.replace(conformer_rnnt.COMPILED_PREFIX, "encoder."): v for k, v in ckpt["model_state_dict"].items()}


def _tensors(ckpt: dict) -> dict[str, torch.Tensor]:
    """The stored tensors, keys as saved."""
    return ckpt["state_dict"] if "state_dict" in ckpt else ckpt["model_state_dict"]


def _load(name: str, path: pathlib.Path) -> nn.Module:
    """Rebuild from the stored config, load strictly, eval mode."""
    ckpt = torch.load(path, weights_only=True)
    model = MODULES[name].build(_config(name, ckpt))
    model.load_state_dict(_state_dict(name, ckpt), strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    out = tmp_path_factory.mktemp("zoo")
    paths = {}
    for name, module in MODULES.items():
        paths[name] = out / name / "model.pt"
        module.make_checkpoint(paths[name])
    return paths


# training twice costs 90-110 s for the two sequence models: those two are in the slow tier
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("conformer_rnnt", "streaming_pitch")
                                  else n for n in MODULES])
def test_make_checkpoint_is_deterministic(name: str, checkpoints: dict, tmp_path: pathlib.Path) -> None:
    again = tmp_path / "again.pt"
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        MODULES[name].make_checkpoint(again)
    finally:
        torch.use_deterministic_algorithms(previous)
    first = _tensors(torch.load(checkpoints[name], weights_only=True))
    second = _tensors(torch.load(again, weights_only=True))
    assert list(first) == list(second)
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert checkpoints[name].read_bytes() == again.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["again.pt"], "temp file left behind"


def test_checkpoint_layouts(checkpoints: dict) -> None:
    bio = torch.load(checkpoints["biosignal"], weights_only=True)
    assert set(bio) == {"state_dict", "hyper_parameters", "pytorch-lightning_version", "epoch", "global_step"}
    assert bio["pytorch-lightning_version"] == "2.4.0"
    assert all(k.startswith("model.") for k in bio["state_dict"])

    rnnt = torch.load(checkpoints["conformer_rnnt"], weights_only=True)
    keys = list(rnnt["model_state_dict"])
    assert "encoder._orig_mod.pre_encode.conv.weight" in keys
    assert not [k for k in keys if k.startswith("encoder.") and not k.startswith("encoder._orig_mod.")]
    assert any(k.startswith("decoder.") for k in keys) and any(k.startswith("joint.") for k in keys)

    for name in ("kws", "conformer_rnnt", "streaming_pitch"):
        assert set(torch.load(checkpoints[name], weights_only=True)) == {"model_state_dict", "config"}


@pytest.mark.parametrize("name", MODULES)
def test_config_is_plain_and_rebuilds_all_keys(name: str, checkpoints: dict) -> None:
    ckpt = torch.load(checkpoints[name], weights_only=True)
    config = _config(name, ckpt)
    assert json.loads(json.dumps(config)) == config
    fresh = MODULES[name].build(config).state_dict()
    stored = _state_dict(name, ckpt)
    assert list(fresh) == list(stored)
    assert all(fresh[k].shape == stored[k].shape for k in fresh)
    assert not any(torch.equal(fresh[k], stored[k]) for k in fresh if k.endswith("weight")), "weights look untrained"


def test_kws_is_decisive(checkpoints: dict) -> None:
    """On fresh waveforms of the task, through the training code's log-mel features."""
    model = _load("kws", checkpoints["kws"])
    x, y = kws._batch(128, torch.Generator().manual_seed(1))
    assert x.shape == (128, 1, 64, 101) and x.dtype == torch.float32
    with torch.no_grad():
        prob = model(x).softmax(-1)
    assert prob.shape == (128, 12)
    assert (prob.argmax(-1) == y).float().mean() > 0.95
    assert prob.max(-1).values.mean() > 0.9


def test_biosignal_is_decisive(checkpoints: dict) -> None:
    model = _load("biosignal", checkpoints["biosignal"])
    x, y = biosignal._batch(256, torch.Generator().manual_seed(1))
    with torch.no_grad():
        prob = model(x).softmax(-1)
    assert prob.shape == (256, 2)
    assert (prob.argmax(-1) == y).float().mean() > 0.95
    assert prob.max(-1).values.mean() > 0.9


@pytest.mark.parametrize("name", ["kws", "biosignal"])
def test_classifier_exports(name: str, checkpoints: dict) -> None:
    model = _load(name, checkpoints[name])
    x = torch.randn(2, 1, 64, 101) if name == "kws" else torch.randn(2, 1, 750)
    ep = torch.export.export(model, (x,), strict=False)
    torch.testing.assert_close(ep.module()(x), model(x), rtol=0, atol=1e-5)


def test_encoder_exports_with_dynamic_time(checkpoints: dict) -> None:
    model = _load("conformer_rnnt", checkpoints["conformer_rnnt"])
    x, length = torch.randn(2, 80, 64), torch.tensor([64, 41])
    batch, time = torch.export.Dim("B"), torch.export.Dim("T", min=3)
    ep = torch.export.export(
        model.encoder, (x, length), dynamic_shapes={"audio_signal": {0: batch, 2: time}, "length": {0: batch}},
        strict=False,
    )
    for size, frames in ((1, 3), (2, 17), (3, 250)):
        x, length = torch.randn(size, 80, frames), torch.tensor([frames, frames // 2 + 1, 2][:size])
        encoded, encoded_len = ep.module()(x, length)
        expected, expected_len = model.encoder(x, length)
        assert encoded.shape == (size, 64, (frames + 1) // 2) and encoded.dtype == torch.float32
        assert encoded_len.dtype == torch.int64
        torch.testing.assert_close(encoded, expected, rtol=0, atol=1e-5)
        assert torch.equal(encoded_len, expected_len)


def test_encoder_ignores_padding(checkpoints: dict) -> None:
    model = _load("conformer_rnnt", checkpoints["conformer_rnnt"])
    x = torch.randn(1, 80, 64)
    with torch.no_grad():
        padded, padded_len = model(x, torch.tensor([40]))
        trimmed, trimmed_len = model(x[..., :40], torch.tensor([40]))
    assert padded_len.item() == trimmed_len.item() == 20
    torch.testing.assert_close(padded[..., :20], trimmed, rtol=0, atol=1e-5)


class _Step(nn.Module):
    """Exposes ``ConformerRNNT.decode_step`` as ``forward`` for export."""

    def __init__(self, model: conformer_rnnt.ConformerRNNT) -> None:
        super().__init__()
        self.model = model

    def forward(self, y_prev, h0, c0, enc_t):
        return self.model.decode_step(y_prev, h0, c0, enc_t)


def _step_inputs(batch: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(3)
    return (
        torch.tensor([16, 3, 7][:batch]),
        torch.randn(1, batch, 64, generator=gen),
        torch.randn(1, batch, 64, generator=gen),
        torch.randn(batch, 64, generator=gen),
    )


def test_decode_step_shapes_and_matches_teacher_forcing(checkpoints: dict) -> None:
    model = _load("conformer_rnnt", checkpoints["conformer_rnnt"])
    logits, h1, c1 = model.decode_step(*_step_inputs(3))
    assert logits.shape == (3, 17) and h1.shape == c1.shape == (1, 3, 64)
    assert logits.dtype == h1.dtype == c1.dtype == torch.float32

    targets = torch.tensor([[4, 9, 2]])
    enc, _ = model(torch.randn(1, 80, 8), torch.tensor([8]))
    with torch.no_grad():
        full = model.joint(enc, model.decoder(targets))[0, 0]
        y, h, c = torch.tensor([model.decoder.blank_id]), torch.zeros(1, 1, 64), torch.zeros(1, 1, 64)
        for u, token in enumerate([None, *targets[0].tolist()]):
            if token is not None:
                y = torch.tensor([token])
            logits, h, c = model.decode_step(y, h, c, enc[:, :, 0])
            torch.testing.assert_close(logits[0], full[u], rtol=0, atol=1e-5)


def test_decode_step_exports_and_runs_in_onnxruntime(checkpoints: dict, tmp_path: pathlib.Path) -> None:
    step = _Step(_load("conformer_rnnt", checkpoints["conformer_rnnt"])).eval()
    args = _step_inputs(2)
    with torch.no_grad():
        expected = step(*args)
    ep = torch.export.export(step, args, strict=False)
    for got, want in zip(ep.module()(*args), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

    names = ["y_prev", "h0", "c0", "enc_t"]
    program = torch.onnx.export(step, args, dynamo=True, input_names=names, output_names=["logits", "h1", "c1"],
                                verbose=False)
    program.save(tmp_path / "step.onnx")
    session = ort.InferenceSession(str(tmp_path / "step.onnx"), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {n: a.numpy() for n, a in zip(names, args)})
    for got, want in zip(outputs, expected):
        np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-4)


def test_pitch_checkpoint_caches_are_zero_buffers(checkpoints: dict) -> None:
    state = torch.load(checkpoints["streaming_pitch"], weights_only=True)["model_state_dict"]
    caches = [k for k in state if k.endswith(".cache")]
    assert len(caches) == 5
    assert all(not state[k].any() and state[k].shape[0] == 1 for k in caches)


def test_pitch_streaming_equals_whole_signal(checkpoints: dict) -> None:
    model = _load("streaming_pitch", checkpoints["streaming_pitch"])
    audio, _, _ = streaming_pitch._batch(model, 1, 20, torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, confidence = model.forward_sequence(audio)
        for _ in range(2):  # the second pass checks reset_state
            model.reset_state()
            chunks = [model(chunk) for chunk in audio.split(model.hop, dim=-1)]
            torch.testing.assert_close(torch.cat([c[0] for c in chunks]), logits[0], rtol=0, atol=1e-5)
            torch.testing.assert_close(torch.cat([c[1] for c in chunks]), confidence[0], rtol=0, atol=1e-5)
    assert chunks[0][0].shape == (1, 24) and chunks[0][1].shape == (1, 1)


def test_pitch_follows_frequency(checkpoints: dict) -> None:
    model = _load("streaming_pitch", checkpoints["streaming_pitch"])
    audio, bins, voiced = streaming_pitch._batch(model, 32, 24, torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits, confidence = model.forward_sequence(audio)
    mask = voiced.bool()
    assert ((logits.argmax(-1) - bins).abs() <= 1)[mask].float().mean() > 0.9
    assert logits.softmax(-1).max(-1).values[mask].mean() > 0.5
    assert confidence[..., 0][mask].mean() > 0.9 and confidence[..., 0][~mask].mean() < 0.1


def test_pitch_export_mutates_cache_buffers(checkpoints: dict) -> None:
    model = _load("streaming_pitch", checkpoints["streaming_pitch"])
    chunks = torch.randn(5, 1, 1, model.hop)
    # The exported program shares buffer storage with the module it came from: export a copy.
    ep = torch.export.export(copy.deepcopy(model), (chunks[0],), strict=False)
    # torch.export keeps the in-place copy_ in its training IR; the functional IR (what to_edge and the
    # ONNX exporter consume) lists the caches as mutated buffers.
    mutated = set(ep.run_decompositions().graph_signature.buffers_to_mutate.values())
    assert mutated == {f"convs.{i}.cache" for i in range(5)}
    exported = ep.module()
    model.reset_state()
    with torch.no_grad():
        for chunk in chunks:
            for got, want in zip(exported(chunk), model(chunk)):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    for name, cache in model.named_buffers():
        if name.endswith(".cache"):
            assert cache.any()
            torch.testing.assert_close(exported.get_buffer(name), cache, rtol=0, atol=1e-5)


def test_pitch_bin_frequencies_match_predictions(checkpoints: dict) -> None:
    model = _load("streaming_pitch", checkpoints["streaming_pitch"])
    centres = model.bin_frequencies()
    assert centres.shape == (24,) and centres[0] == 80.0 and abs(centres[-1] - 800.0) < 1e-3
    picked = torch.arange(2, 22, 3)
    t = torch.arange(12 * model.hop) / model.sample_rate
    audio = 0.5 * torch.sin(2 * torch.pi * centres[picked, None] * t).unsqueeze(1)
    with torch.no_grad():
        logits, _ = model.forward_sequence(audio)
    predicted = logits[:, 6:].argmax(-1)  # past the start-up hops
    assert ((predicted - picked[:, None]).abs() <= 1).float().mean() > 0.9
