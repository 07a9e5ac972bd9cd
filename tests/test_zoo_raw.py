"""The zoo's raw inputs (what an app really has) and the training code's preprocessing of them:
PNG files for digits, one-second waveforms and their log-mel features for kws, sentences and
transformers' tokenizer for the text classifier (and onnxruntime-extensions' tokenizer op agreeing
with it). The tests that train a checkpoint are marked slow."""
from __future__ import annotations

import importlib.util
import io
import math
import pathlib

import numpy as np
import pytest
import torch

from models import digits, kws, text
from models.audio_features import FEATURES, hz_to_mel, log_mel, mel_filterbank
from tests.conftest import unavailable


needs_transformers = pytest.mark.usefixtures("transformers_installed")


# -- digits: PNG files ---------------------------------------------------------------------------

def test_the_kept_digits_split_is_scikit_learns() -> None:
    """models/digits_split.npz holds the indices of scikit-learn's stratified split, which the
    checkpoint was trained on: read without importing scikit-learn, the same arrays."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    expected = train_test_split((data.images / 16.0).astype(np.float32)[:, None], data.target.astype(np.int64),
                                test_size=0.2, random_state=0, stratify=data.target)
    for mine, theirs in zip(digits._split(), expected):
        np.testing.assert_array_equal(mine, theirs)


def test_pngs_decode_to_the_test_images() -> None:
    from PIL import Image

    pngs, split = digits.test_pngs(), digits.test_split()
    files, images = pngs["inputs"]["png"], split["inputs"]["image"]
    assert len(files) == len(images) == 360 and np.array_equal(pngs["labels"], split["labels"])
    for png, image in zip(files, images):
        assert isinstance(png, bytes) and png.startswith(b"\x89PNG\r\n\x1a\n")
        with Image.open(io.BytesIO(png)) as decoded:
            assert decoded.mode == "L" and decoded.size == (8, 8)
        x = digits.preprocess_png(png)["image"]
        assert x.shape == (1, 1, 8, 8) and x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0
        np.testing.assert_allclose(x, image, rtol=0, atol=1 / 510 + 1e-6)  # 8 bits: half a step


def test_train_pngs_are_the_train_split() -> None:
    pngs, split = digits.train_pngs(16, seed=3)["png"], digits.train_split(16, seed=3)["image"]
    decoded = np.stack([digits.preprocess_png(p)["image"] for p in pngs])
    np.testing.assert_allclose(decoded, split, rtol=0, atol=1 / 510 + 1e-6)


def test_preprocess_png_takes_any_mode_but_only_8x8() -> None:
    from PIL import Image

    image = digits.test_split()["inputs"]["image"][0, 0, 0]
    rgb = io.BytesIO()
    Image.fromarray(np.rint(image * 255).astype(np.uint8)).convert("RGB").save(rgb, format="PNG")
    np.testing.assert_array_equal(digits.preprocess_png(rgb.getvalue())["image"],
                                  digits.preprocess_png(digits.test_pngs()["inputs"]["png"][0])["image"])
    big = io.BytesIO()
    Image.new("L", (16, 16)).save(big, format="PNG")
    with pytest.raises(ValueError, match="8x8"):
        digits.preprocess_png(big.getvalue())


# -- kws: waveforms and log-mel ------------------------------------------------------------------

def _torchaudio_fbanks() -> torch.Tensor:
    """torchaudio.functional.melscale_fbanks(201, 20, 8000, 64, 16000, norm=None, mel_scale="htk"),
    its arithmetic in float32 (torchaudio is not installed)."""
    all_freqs = torch.linspace(0, 16000 // 2, 201)
    m_min, m_max = 2595.0 * math.log10(1.0 + 20.0 / 700.0), 2595.0 * math.log10(1.0 + 8000.0 / 700.0)
    f_pts = 700.0 * (10 ** (torch.linspace(m_min, m_max, 64 + 2) / 2595.0) - 1.0)
    f_diff = f_pts[1:] - f_pts[:-1]
    slopes = f_pts.unsqueeze(0) - all_freqs.unsqueeze(1)
    down, up = (-1.0 * slopes[:, :-2]) / f_diff[:-1], slopes[:, 2:] / f_diff[1:]
    return torch.max(torch.zeros(1), torch.min(down, up))


def _torch_log_mel(waveform: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """torchaudio's MelSpectrogram + log, written with torch.stft."""
    x = torch.from_numpy(waveform).to(dtype)
    spec = torch.stft(x, n_fft=400, hop_length=160, win_length=400,
                      window=torch.hann_window(400, periodic=True, dtype=dtype), center=True, pad_mode="reflect",
                      onesided=True, return_complex=True).abs() ** 2                          # (..., 201, 101)
    fb = torch.from_numpy(mel_filterbank()).to(dtype)
    return torch.log((spec.transpose(-1, -2) @ fb).transpose(-1, -2) + 1e-6).numpy()


def test_mel_filterbank_is_torchaudios() -> None:
    fb = mel_filterbank()
    assert fb.shape == (201, 64) and fb.dtype == np.float32
    np.testing.assert_allclose(fb, _torchaudio_fbanks().numpy(), rtol=0, atol=1e-5)
    assert fb.max(axis=0).min() > 0.3, "a mel band without any FFT bin"
    peaks = np.linspace(0, 8000, 201)[fb.argmax(axis=0)]
    assert np.all(np.diff(peaks) >= 0) and abs(hz_to_mel(700.0) - 2595 * math.log10(2)) < 1e-9
    assert mel_filterbank(201, 64, 16000, 20.0, 8000.0).tobytes() == fb.tobytes()
    assert {k: FEATURES[k] for k in ("sample_rate", "n_fft", "hop_length", "n_mels", "f_min", "f_max")} == {
        "sample_rate": 16000, "n_fft": 400, "hop_length": 160, "n_mels": 64, "f_min": 20.0, "f_max": 8000.0}


def test_log_mel_is_the_torch_stft_formulation() -> None:
    waveforms = kws.test_waveforms(64)["inputs"]["waveform"][:, 0]
    ours = log_mel(waveforms)
    assert ours.shape == (64, 64, 101) and ours.dtype == np.float32
    # the same arithmetic in float64: the conventions (padding, window, filters, log) are the same
    np.testing.assert_allclose(ours, _torch_log_mel(waveforms, torch.float64), rtol=0, atol=1e-5)
    # float32 torch.stft: within 1e-4 except where the band is near log's floor (mel ~ 1e-6), where
    # float32's rounding next to a loud tone in the same frame is a large part of the band's energy
    single = _torch_log_mel(waveforms, torch.float32)
    error = np.abs(single - ours)
    assert error[ours > -8].max() < 2e-4 and error.max() < 2e-3  # AVX-512's float32 stft: 1.03e-4
    noise = np.random.default_rng(0).normal(0, 0.1, (4, 16000)).astype(np.float32)
    np.testing.assert_allclose(log_mel(noise), _torch_log_mel(noise, torch.float32), rtol=0, atol=1e-4)


def test_log_mel_shapes() -> None:
    assert log_mel(np.zeros(16000, np.float32)).shape == (64, 101)
    assert log_mel(np.zeros((2, 3, 16000), np.float32)).shape == (2, 3, 64, 101)
    np.testing.assert_allclose(log_mel(np.zeros(16000, np.float32)), np.log(1e-6), rtol=1e-6)
    with pytest.raises(ValueError, match="16000"):
        log_mel(np.zeros(8000, np.float32))


def test_preprocess_waveform_gives_test_split() -> None:
    waves, split = kws.test_waveforms(), kws.test_split()
    x, mel = waves["inputs"]["waveform"], split["inputs"]["mel"]
    assert x.shape == (256, 1, 16000) and x.dtype == np.float32 and np.abs(x).max() <= 1.0
    assert mel.shape == (256, 1, 1, 64, 101) and mel.dtype == np.float32
    assert np.array_equal(waves["labels"], split["labels"]) and waves["labels"].dtype == np.int64
    for i in range(len(x)):
        out = kws.preprocess_waveform(x[i])
        assert set(out) == {"mel"} and out["mel"].shape == (1, 1, 64, 101) and out["mel"].dtype == np.float32
        np.testing.assert_array_equal(out["mel"], mel[i])


def test_waveform_task_is_seeded_and_split() -> None:
    assert np.array_equal(kws.test_waveforms(8)["inputs"]["waveform"], kws.test_waveforms(8)["inputs"]["waveform"])
    train = kws.train_waveforms(8, seed=0)["waveform"]
    assert train.shape == (8, 1, 16000) and train.dtype == np.float32
    assert not np.array_equal(train, kws.train_waveforms(8, seed=1)["waveform"])
    assert not np.array_equal(train, kws.test_waveforms(8)["inputs"]["waveform"])
    np.testing.assert_array_equal(kws.train_split(8, seed=0)["mel"], log_mel(train)[:, None])
    labels = kws.test_waveforms()["labels"]
    assert set(labels.tolist()) == set(range(12))


# -- text: vocabulary and tokenizers -------------------------------------------------------------

def test_vocab_file_is_the_generated_vocabulary(tmp_path: pathlib.Path) -> None:
    lines = text.VOCAB_FILE.read_text(encoding="utf-8").splitlines()
    assert lines == text.vocab_tokens() and len(set(lines)) == len(lines)
    assert lines[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert text.write_vocab(tmp_path / "v.txt").read_bytes() == text.VOCAB_FILE.read_bytes()
    assert all(t == t.lower() and " " not in t for t in lines[5:])


def test_sentences_use_whole_words_pieces_and_unknown_words() -> None:
    vocab = set(text.vocab_tokens())
    for base, splits in text.TOPICS.values():
        assert all(text.wordpiece(w, vocab) == [w] for w in base)
        assert all(text.wordpiece(w, vocab) == list(pieces) for w, pieces in splits.items())
    assert all(text.wordpiece(w, vocab) == [w] for w in text.FILLER)
    # no prefix of an unknown word is a token: onnxruntime-extensions would keep that prefix
    # (see test_tokenizer_differences_the_data_avoids), transformers maps the whole word to [UNK]
    assert not [w for w in text.UNKNOWN for k in range(1, len(w) + 1) if w[:k] in vocab]
    texts, labels = text.sentences(text.TEST, 256)
    assert labels.dtype == np.int64 and set(labels.tolist()) == {0, 1, 2, 3}
    words = [t.lower().rstrip(".!?").replace(",", " ,").split() for t in texts]
    assert all(4 <= len([w for w in ws if w != ","]) <= 12 for ws in words)
    assert all(text._token_count([*ws, "."], vocab) <= text.MAX_TOKENS for ws in words)
    flat = {w for ws in words for w in ws}
    assert flat & set(text.UNKNOWN) and flat & {w for _, s in text.TOPICS.values() for w in s}
    assert texts == text.sentences(text.TEST, 256)[0] != text.sentences(text.TRAIN, 256)[0]


@needs_transformers
def test_test_sentences_and_test_split_are_the_same_examples() -> None:
    raw, split = text.test_sentences(), text.test_split()
    sentences = raw["inputs"]["text"]
    assert sentences.shape == (256, 1) and sentences.dtype == object and isinstance(sentences[0, 0], str)
    ids, mask = split["inputs"]["input_ids"], split["inputs"]["attention_mask"]
    assert ids.shape == mask.shape == (256, 1, 16) and ids.dtype == mask.dtype == np.int64
    assert np.array_equal(raw["labels"], split["labels"])
    vocab = set(text.vocab_tokens())
    tokens = text.vocab_tokens()
    for sentence, row_ids, row_mask in zip(sentences[:, 0], ids[:, 0], mask[:, 0]):
        one = text.preprocess_text(sentence)
        n = one["input_ids"].shape[1]
        assert one["input_ids"].dtype == one["attention_mask"].dtype == np.int64
        assert one["attention_mask"].tolist() == [[1] * n] and row_mask.tolist() == [1] * n + [0] * (16 - n)
        assert row_ids.tolist() == one["input_ids"][0].tolist() + [0] * (16 - n)
        words = sentence.lower().replace(",", " ,").replace(".", " .").replace("!", " !").replace("?", " ?").split()
        expected = ["[CLS]", *[p for w in words for p in text.wordpiece(w, vocab)], "[SEP]"]
        assert [tokens[i] for i in one["input_ids"][0]] == expected
    train = text.train_split(8, seed=2)
    assert train["input_ids"].shape == (8, 1, 16) and train["attention_mask"].dtype == np.int64


@needs_transformers
def test_the_tokenizer_loads_the_whole_vocabulary() -> None:
    """transformers 5's BertTokenizerFast takes the file as vocab=; vocab_file= (4.x) is swallowed
    by **kwargs and leaves 5 special tokens: every word [UNK]. text.tokenizer() refuses that."""
    tok = text.tokenizer()
    assert len(tok.get_vocab()) == len(text.vocab_tokens())
    assert tok.tokenize("The football team SCORED, zorbly!") == ["the", "foot", "##ball", "team", "score", "##d",
                                                                  ",", "[UNK]", "!"]


def _ortx_session(**param):
    """A graph of onnxruntime-extensions' BertTokenizer step (PrePostProcessor) in front of an
    identity model: a sentence (string [1]) -> input_ids, attention_mask (int64 [1, T])."""
    if importlib.util.find_spec("onnxruntime_extensions") is None:
        unavailable("onnxruntime-extensions is not installed (requirements.txt)")
    import onnx
    import onnxruntime as ort
    import onnxruntime_extensions
    from onnx import TensorProto, helper
    from onnxruntime_extensions.tools.pre_post_processing import PrePostProcessor, create_named_value
    from onnxruntime_extensions.tools.pre_post_processing.steps import BertTokenizer, TokenizerParam

    names = ["input_ids", "attention_mask"]
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", [n], [f"{n}_out"]) for n in names], "identity",
        [helper.make_tensor_value_info(n, TensorProto.INT64, [1, "T"]) for n in names],
        [helper.make_tensor_value_info(f"{n}_out", TensorProto.INT64, [1, "T"]) for n in names]),
        opset_imports=[helper.make_opsetid("", 17)])
    # TokenizerParam reads a vocabulary *file* as JSON: a vocab.txt is given as {token: id}
    vocab = {token: i for i, token in enumerate(text.VOCAB_FILE.read_text(encoding="utf-8").splitlines())}
    ppp = PrePostProcessor([create_named_value("text", onnx.TensorProto.STRING, [1])], onnx_opset=17)
    ppp.add_pre_processing([BertTokenizer(TokenizerParam(vocab_or_file=vocab, **param),
                                          need_token_type_ids_output=True)])  # (sic): True drops them
    options = ort.SessionOptions()
    options.register_custom_ops_library(onnxruntime_extensions.get_library_path())
    session = ort.InferenceSession(ppp.run(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    return lambda sentence: session.run(None, {"text": np.array([sentence], dtype=object)})


@needs_transformers
@pytest.mark.parametrize("strip_accents", [0, 1])
def test_ortx_bert_tokenizer_matches_transformers(strip_accents: int) -> None:
    run = _ortx_session(do_lower_case=1, strip_accents=strip_accents)
    sentences = [*text.test_sentences()["inputs"]["text"][:, 0], *text.train_sentences(256, seed=0)["text"][:, 0]]
    for sentence in sentences:
        ids, mask = run(sentence)
        expected = text.preprocess_text(sentence)
        assert ids.dtype == mask.dtype == np.int64 and ids.shape == mask.shape == expected["input_ids"].shape
        assert ids.tolist() == expected["input_ids"].tolist(), sentence
        assert mask.tolist() == expected["attention_mask"].tolist(), sentence


@needs_transformers
@pytest.mark.parametrize("sentence, transformers_ids, ortx_ids", [
    # a word out of the vocabulary with a vocabulary prefix: transformers -> one [UNK] for the word,
    # onnxruntime-extensions -> the prefix's pieces, then [UNK] for the rest
    ("teamx", ["[UNK]"], ["team", "[UNK]"]),
    # do_lower_case=True strips accents in transformers; the op needs strip_accents=1 for that
    ("Téam", ["team"], None),
    # transformers matches special tokens written in the text; the op splits them as punctuation
    ("[SEP] team", ["[SEP]", "team"], ["[UNK]", "[UNK]", "[UNK]", "team"]),
])
def test_tokenizer_differences_the_data_avoids(sentence: str, transformers_ids: list, ortx_ids: list | None) -> None:
    tokens = text.vocab_tokens()
    hf = [tokens[i] for i in text.preprocess_text(sentence)["input_ids"][0]][1:-1]
    assert hf == transformers_ids
    plain = [tokens[i] for i in _ortx_session(do_lower_case=1)(sentence)[0][0]][1:-1]
    stripped = [tokens[i] for i in _ortx_session(do_lower_case=1, strip_accents=1)(sentence)[0][0]][1:-1]
    if ortx_ids is None:  # accents: differs without strip_accents, agrees with it
        assert plain != hf and stripped == hf
    else:
        assert plain == stripped == ortx_ids


# -- the checkpoints (training: slow) ------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are small: one intra-op thread is as fast as two, and far faster on a busy host."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    out = tmp_path_factory.mktemp("raw-zoo")
    paths = {"kws": out / "kws.pt"}
    kws.make_checkpoint(paths["kws"])
    if _has_transformers():
        paths["text"] = out / "text.pt"
        text.make_checkpoint(paths["text"])
    return paths


def _load(module, path: pathlib.Path) -> torch.nn.Module:
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt) == {"model_state_dict", "config"}
    model = module.build(ckpt["config"])
    model.load_state_dict(ckpt["model_state_dict"], strict=True)
    return model.eval()


@pytest.mark.slow
def test_kws_reaches_its_accuracy_from_mel_and_from_waveforms(trained: dict) -> None:
    model = _load(kws, trained["kws"])
    split = kws.test_split()
    with torch.no_grad():
        logits = model(torch.from_numpy(split["inputs"]["mel"][:, 0]))
        mel = np.concatenate([kws.preprocess_waveform(w)["mel"] for w in kws.test_waveforms()["inputs"]["waveform"]])
        raw = model(torch.from_numpy(mel))
    labels = torch.from_numpy(split["labels"])
    assert (logits.argmax(-1) == labels).float().mean() >= 0.95
    assert torch.equal(raw, logits) or (raw - logits).abs().max() < 1e-5
    assert logits.abs().max() < 12  # moderate logits for FP16


@needs_transformers
@pytest.mark.slow
def test_text_reaches_its_accuracy_from_ids_and_from_sentences(trained: dict) -> None:
    model = _load(text, trained["text"])
    split = text.test_split()
    ids, mask = (torch.from_numpy(split["inputs"][k][:, 0]) for k in ("input_ids", "attention_mask"))
    with torch.no_grad():
        logits = model(ids, mask)
        raw = torch.cat([model(*(torch.from_numpy(v) for v in text.preprocess_text(s).values()))
                         for s in text.test_sentences()["inputs"]["text"][:, 0]])
    assert logits.shape == (256, 4) and logits.dtype == torch.float32
    labels = torch.from_numpy(split["labels"])
    assert (logits.argmax(-1) == labels).float().mean() >= 0.95
    assert (raw.argmax(-1) == labels).float().mean() >= 0.95
    torch.testing.assert_close(raw, logits, rtol=0, atol=1e-4)  # padding is masked out
    assert logits.abs().max() < 12


@needs_transformers
@pytest.mark.slow
def test_text_checkpoint_is_deterministic_and_rebuilds(trained: dict, tmp_path: pathlib.Path) -> None:
    import json

    again = tmp_path / "again.pt"
    text.make_checkpoint(again)
    assert again.read_bytes() == trained["text"].read_bytes()
    ckpt = torch.load(again, weights_only=True)
    assert json.loads(json.dumps(ckpt["config"])) == ckpt["config"]
    assert ckpt["config"]["vocab_size"] == len(text.vocab_tokens())
    fresh = text.build(ckpt["config"]).state_dict()
    assert list(fresh) == list(ckpt["model_state_dict"])


@needs_transformers
@pytest.mark.slow
def test_text_model_exports_with_a_dynamic_sequence(trained: dict) -> None:
    model = _load(text, trained["text"])
    ids = torch.from_numpy(text.preprocess_text("The team scored a goal.")["input_ids"])
    mask = torch.ones_like(ids)
    tokens = torch.export.Dim("tokens", min=2, max=text.MAX_POSITIONS)
    ep = torch.export.export(model, (ids, mask), dynamic_shapes={"input_ids": {1: tokens},
                                                                 "attention_mask": {1: tokens}}, strict=False)
    for sentence in text.test_sentences(8)["inputs"]["text"][:, 0]:
        one = {k: torch.from_numpy(v) for k, v in text.preprocess_text(sentence).items()}
        args = (one["input_ids"], one["attention_mask"])
        torch.testing.assert_close(ep.module()(*args), model(*args), rtol=0, atol=1e-5)
