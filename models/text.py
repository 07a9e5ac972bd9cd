"""A small BERT sentence classifier built from a transformers config, with the project's own vocabulary.

The task: sentences of a small synthetic English-like language, 4 topics (TOPICS: sport, weather,
food, music). Each sentence mixes 2-3 words of its topic with shared filler words, sometimes one
word of another topic (a distractor), an unknown word (tokenized as [UNK]), a comma; it starts with
a capital letter and ends in ". ! ?". Some words are split by WordPiece into "##" pieces
("football" -> foot ##ball). Every sentence is at most MAX_TOKENS = 16 tokens with [CLS] and [SEP].

The vocabulary (models/text_vocab.txt, one token a line, id = line number) is made by the project:
`vocab_tokens()` lists it, `write_vocab()` writes it, tests check the two agree. The "user's
preprocessing" is transformers' own tokenizer, BertTokenizerFast on that file with do_lower_case=True
(`tokenizer`, `preprocess_text`); the model is BertForSequenceClassification from a BertConfig, wrapped so that
forward(input_ids, attention_mask) returns the logits (B, 4).

transformers is imported inside functions only: this module imports without it.
`python -m models.text checkpoints/text_bert.pt` trains it deterministically.
"""
from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from models.checkpoint_io import fit, intra_op_threads, main, save_atomic
from models.splits import TEST, TRAIN

VOCAB_FILE = pathlib.Path(__file__).with_name("text_vocab.txt")
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD_ID, UNK_ID, CLS_ID, SEP_ID = 0, 1, 2, 3
MAX_TOKENS = 16           # test_split/train_split pad to this; every sentence fits ([CLS] ... [SEP])
MAX_POSITIONS = 64        # the model's max_position_embeddings: the tokenizer truncates there
NUM_CLASSES = 4
PUNCTUATION = (".", ",", "!", "?")

FILLER = (
    "the a an this that these those my our your their his her its we they i you he she it "
    "is was are were be been has have had will would can could should do did not no "
    "very really quite so too just still again also only even then now today tonight yesterday "
    "tomorrow and but or because when while after before during about with without for of to "
    "from in on at by into over under near all some many every each more most other another "
    "new old good great big small long short first last next one two three four few lot "
    "time day night week weekend morning evening afternoon year moment people friend family "
    "city town home place street school everyone someone there here what who how why "
    "think thought said say saw see seen feel felt like liked love loved want wanted know knew "
    "get got went go going come came make made take took look looked watch watched tell told "
    "hope hoped wait waited start started end ended keep kept bring brought"
).split()

# Topic words, and topic words that WordPiece splits: word -> its pieces (all in the vocabulary).
TOPICS = {
    "sport": (
        "team goal match coach player score league ball stadium referee win season race run "
        "champion kick tennis golf final trophy sprint medal penalty defender striker".split(),
        {"football": ("foot", "##ball"), "basketball": ("basket", "##ball"), "runner": ("run", "##ner"),
         "scored": ("score", "##d"), "teams": ("team", "##s"), "players": ("player", "##s"),
         "winning": ("win", "##ning"), "goals": ("goal", "##s"), "coaches": ("coach", "##es")},
    ),
    "weather": (
        "rain storm cloud wind snow sun fog thunder forecast cold warm temperature ice frost "
        "humid breeze flood sky hail lightning drizzle heat umbrella climate degrees".split(),
        {"rainy": ("rain", "##y"), "rainfall": ("rain", "##fall"), "snowfall": ("snow", "##fall"),
         "cloudy": ("cloud", "##y"), "sunshine": ("sun", "##shine"), "windy": ("wind", "##y"),
         "storms": ("storm", "##s"), "snowing": ("snow", "##ing"), "foggy": ("fog", "##gy")},
    ),
    "food": (
        "bread soup cheese salad pasta rice cake bake cook oven kitchen recipe dinner lunch "
        "sugar salt pepper spicy fruit apple meal chef butter garlic onion".split(),
        {"baker": ("bake", "##r"), "cooked": ("cook", "##ed"), "cheesecake": ("cheese", "##cake"),
         "apples": ("apple", "##s"), "cooking": ("cook", "##ing"), "meals": ("meal", "##s"),
         "baked": ("bake", "##d"), "onions": ("onion", "##s"), "salty": ("salt", "##y")},
    ),
    "music": (
        "song guitar drum piano melody band concert singer sing album rhythm chord violin tune "
        "choir stage jazz note lyric radio playlist bass orchestra tempo opera".split(),
        {"songs": ("song", "##s"), "drummer": ("drum", "##mer"), "singing": ("sing", "##ing"),
         "guitarist": ("guitar", "##ist"), "bands": ("band", "##s"), "drums": ("drum", "##s"),
         "concerts": ("concert", "##s"), "singers": ("singer", "##s"), "notes": ("note", "##s")},
    ),
}
TOPIC_NAMES = tuple(TOPICS)

# Made-up words with no prefix in the vocabulary: WordPiece gives [UNK] for each.
UNKNOWN = ("zorbly", "quixet", "vexto", "krandle", "blimfa", "yxo", "jubz", "qwenda", "xyrith", "zuqo")
# Vocabulary entries the sentences never use (a real vocabulary has those too).
UNUSED = ("##a", "##o", "##able", "##less", "##ment", "##ful", "##est", "##en", "##al", "##ize")


def vocab_tokens() -> list[str]:
    """The vocabulary in id order: specials, punctuation, filler words, topic words, ## pieces."""
    words: list[str] = []
    for base, splits in TOPICS.values():
        words.extend(base)
        words.extend(p for pieces in splits.values() for p in pieces if not p.startswith("##"))
    pieces = [p for _, splits in TOPICS.values() for ps in splits.values() for p in ps if p.startswith("##")]
    tokens = [*SPECIAL, *PUNCTUATION, *FILLER, *words, *pieces, *UNUSED]
    return list(dict.fromkeys(tokens))  # first occurrence of each, in order


def write_vocab(path: str | os.PathLike = VOCAB_FILE) -> pathlib.Path:
    """Write vocab_tokens() one a line (the committed models/text_vocab.txt is this file)."""
    path = pathlib.Path(path)
    path.write_text("".join(f"{t}\n" for t in vocab_tokens()), encoding="utf-8")
    return path


def _vocab_path(vocab: str | os.PathLike | None) -> str:
    return str(VOCAB_FILE if vocab is None else vocab)


def wordpiece(word: str, vocab: set[str]) -> list[str]:
    """Greedy longest-match-first WordPiece of one lowercase word: [UNK] if any part has no match."""
    pieces, start = [], 0
    while start < len(word):
        for end in range(len(word), start, -1):
            piece = word[start:end] if start == 0 else "##" + word[start:end]
            if piece in vocab:
                break
        else:
            return ["[UNK]"]
        pieces.append(piece)
        start = end
    return pieces


def _token_count(words: list[str], vocab: set[str]) -> int:
    return 2 + sum(1 if w in PUNCTUATION else len(wordpiece(w, vocab)) for w in words)


def _sentence(label: int, rng: np.random.Generator, vocab: set[str]) -> str:
    """One sentence of class `label`, at most MAX_TOKENS tokens ([CLS], [SEP] included)."""
    while True:
        base, splits = TOPICS[TOPIC_NAMES[label]]
        own = [str(w) for w in rng.choice([*base, *splits], size=int(rng.integers(2, 4)), replace=False)]
        extra = []
        if rng.random() < 0.3:  # a distractor from another topic, always outnumbered
            other = TOPICS[TOPIC_NAMES[(label + int(rng.integers(1, NUM_CLASSES))) % NUM_CLASSES]]
            extra.append(str(rng.choice([*other[0], *other[1]])))
        if rng.random() < 0.3:
            extra.append(str(rng.choice(UNKNOWN)))
        n_words = int(rng.integers(4, 13))
        filler = [str(w) for w in rng.choice(FILLER, size=max(0, n_words - len(own) - len(extra)))]
        words = [*own, *extra, *filler]
        words = [words[i] for i in rng.permutation(len(words))]
        if len(words) > 4 and rng.random() < 0.3:
            words.insert(int(rng.integers(2, len(words) - 1)), ",")
        words.append(str(rng.choice([".", ".", "!", "?"])))
        if _token_count(words, vocab) <= MAX_TOKENS:
            break
    text = " ".join(words).replace(" ,", ",")
    text = text[:-2] + text[-1]  # "... word ." -> "... word."
    return text[0].upper() + text[1:]


def sentences(split: int, samples: int, seed: int = 0, vocab: str | os.PathLike | None = None
              ) -> tuple[list[str], np.ndarray]:
    """`samples` sentences of the split and seed (numpy seed 2 * seed + split, as models.splits) and labels."""
    tokens = set(pathlib.Path(_vocab_path(vocab)).read_text(encoding="utf-8").splitlines())
    rng = np.random.default_rng(2 * seed + split)
    labels = rng.integers(0, NUM_CLASSES, samples)
    return [_sentence(int(k), rng, tokens) for k in labels], labels.astype(np.int64)


def tokenizer(vocab: str | os.PathLike | None = None):
    """transformers' BertTokenizerFast on the vocabulary file (models/text_vocab.txt), do_lower_case=True.

    transformers 5 takes the file as `vocab=`; its BertTokenizerFast(vocab_file=...) (the 4.x
    keyword) silently builds a 5-token vocabulary that maps every word to [UNK]. Both are tried,
    and the tokenizer is refused unless it holds every line of the file.
    """
    from transformers import BertTokenizerFast

    path = _vocab_path(vocab)
    size = len(pathlib.Path(path).read_text(encoding="utf-8").splitlines())
    for keyword in ("vocab", "vocab_file"):  # transformers 5.x, then 4.x
        built = BertTokenizerFast(**{keyword: path}, do_lower_case=True)
        if len(built.get_vocab()) == size:
            return built
    raise RuntimeError(f"BertTokenizerFast did not load the {size} tokens of {path}")


def preprocess_text(sentence: str, vocab: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """The user's preprocessing of one sentence with transformers' tokenizer: no padding, truncation
    at the model's 64 positions. {"input_ids": int64 (1, T), "attention_mask": int64 (1, T)} with
    T = number of tokens including [CLS] and [SEP] (mask all ones)."""
    encoded = tokenizer(vocab)([sentence], truncation=True, max_length=MAX_POSITIONS, return_tensors="np",
                               return_token_type_ids=False)
    return {"input_ids": encoded["input_ids"].astype(np.int64),
            "attention_mask": encoded["attention_mask"].astype(np.int64)}


def tokenize(texts: list[str], vocab: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """Batch tokenization padded to MAX_TOKENS: {"input_ids", "attention_mask"} int64 (N, 16),
    [PAD] = 0 and mask 0 on padding. Refuses a sentence longer than MAX_TOKENS tokens."""
    encoded = tokenizer(vocab)(list(texts), padding="max_length", max_length=MAX_TOKENS, return_tensors="np",
                               return_token_type_ids=False)
    if encoded["input_ids"].shape[1] != MAX_TOKENS:
        raise ValueError(f"a sentence has more than {MAX_TOKENS} tokens")
    return {"input_ids": encoded["input_ids"].astype(np.int64),
            "attention_mask": encoded["attention_mask"].astype(np.int64)}


def test_sentences(samples: int = 256, vocab: str | os.PathLike | None = None) -> dict[str, Any]:
    """Held-out sentences (the examples of test_split, same order): {"inputs": {"text": str array
    (N, 1) of python str (dtype object)}, "labels": int64 (N,)}."""
    texts, labels = sentences(TEST, samples, 0, vocab)
    text = np.empty((len(texts), 1), dtype=object)
    text[:, 0] = texts
    return {"inputs": {"text": text}, "labels": labels}


def train_sentences(samples: int = 128, seed: int = 0, vocab: str | os.PathLike | None = None
                    ) -> dict[str, np.ndarray]:
    """Training-split sentences (those train_split tokenizes): {"text": str array (N, 1), dtype object}."""
    texts, _ = sentences(TRAIN, samples, seed, vocab)
    text = np.empty((len(texts), 1), dtype=object)
    text[:, 0] = texts
    return {"text": text}


def test_split(samples: int = 256, vocab: str | os.PathLike | None = None) -> dict[str, Any]:
    """Held-out examples tokenized and padded to 16: {"inputs": {"input_ids", "attention_mask": int64
    (N, 1, 16)}, "labels": int64 (N,)}."""
    texts, labels = sentences(TEST, samples, 0, vocab)
    return {"inputs": {k: v[:, None] for k, v in tokenize(texts, vocab).items()}, "labels": labels}


def train_split(samples: int = 128, seed: int = 0, vocab: str | os.PathLike | None = None
                ) -> dict[str, np.ndarray]:
    """Calibration examples from the training distribution: {"input_ids", "attention_mask": int64 (N, 1, 16)}."""
    texts, _ = sentences(TRAIN, samples, seed, vocab)
    return {k: v[:, None] for k, v in tokenize(texts, vocab).items()}


class TextClassifier(nn.Module):
    """transformers' BertForSequenceClassification(BertConfig(**config)), returning the logits only.

    forward(input_ids int64 (B, T), attention_mask int64 (B, T)) -> logits float32 (B, num_labels);
    token_type_ids are all zero (one segment). T <= max_position_embeddings.
    """

    def __init__(self, **config: Any) -> None:
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        self.net = BertForSequenceClassification(BertConfig(**config))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids=input_ids, attention_mask=attention_mask).logits


def model_config(vocab: str | os.PathLike | None = None) -> dict[str, Any]:
    """The BertConfig keyword arguments stored in the checkpoint (plain JSON values)."""
    size = len(pathlib.Path(_vocab_path(vocab)).read_text(encoding="utf-8").splitlines())
    return {"vocab_size": size, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "intermediate_size": 128, "max_position_embeddings": MAX_POSITIONS, "num_labels": NUM_CLASSES}


def build(config: dict[str, Any]) -> TextClassifier:
    """Rebuild the model from the config stored in its checkpoint."""
    return TextClassifier(**config)


TRAIN_STEPS = 300
TRAIN_BATCH = 64
LEARNING_RATE = 2e-3
TRAIN_SEED = 1000  # the training sentences: numpy seed 2 * 1000 + TRAIN, apart from calibration's seeds


def make_checkpoint(path: str | pathlib.Path, steps: int = TRAIN_STEPS) -> None:
    """Train on the synthetic topic task and write ``{"model_state_dict", "config"}`` atomically.

    One intra-op thread (restored afterwards), seeded; label smoothing keeps the logits moderate
    for FP16 (|logit| < ~5).
    """
    with intra_op_threads(1):
        torch.manual_seed(0)
        config = model_config()
        model = build(config)
        texts, labels = sentences(TRAIN, steps * TRAIN_BATCH, TRAIN_SEED)
        data = {k: torch.from_numpy(v) for k, v in tokenize(texts).items()}
        y = torch.from_numpy(labels)

        def loss_at(step: int) -> torch.Tensor:
            batch = slice(step * TRAIN_BATCH, (step + 1) * TRAIN_BATCH)
            logits = model(data["input_ids"][batch], data["attention_mask"][batch])
            return F.cross_entropy(logits, y[batch], label_smoothing=0.05)

        optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.01)
        state = fit(model, optimizer, steps, LEARNING_RATE, loss_at)
    save_atomic({"model_state_dict": state, "config": config}, pathlib.Path(path))


if __name__ == "__main__":
    main(make_checkpoint, __doc__)
