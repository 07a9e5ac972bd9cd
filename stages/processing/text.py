"""Text steps: a sentence to token ids, with the vocabulary the model was trained with."""
from __future__ import annotations

from pathlib import Path

from . import Step, register


@register
class WordPiece(Step):
    """A sentence (string [1]) -> input_ids and attention_mask (int64 [1, tokens]), BERT's
    WordPiece with [CLS]/[SEP], from a vocabulary file (one token per line), lower-cased when
    lower_case. onnxruntime-extensions' BertTokenizer custom op."""

    name = "wordpiece"
    custom_op = True

    def __init__(self, vocab: str, lower_case: bool = True):
        super().__init__(vocab=str(vocab), lower_case=bool(lower_case))

    def onnx(self) -> list:
        from onnxruntime_extensions.tools.pre_post_processing.steps import BertTokenizer, TokenizerParam

        vocab = Path(self.params["vocab"])
        if not vocab.is_file():
            from pipelines.errors import PipelineError

            raise PipelineError(f"the wordpiece vocabulary {vocab} does not exist",
                                fix="point the step's vocab at the model's vocabulary file")
        # a vocab.txt as {token: id}: given a path, TokenizerParam reads it as JSON; lower-casing
        # strips accents too, as BERT's (and transformers') basic tokenizer does
        tokens = {line.rstrip("\n"): index for index, line in enumerate(vocab.read_text().splitlines(True))}
        lower = int(self.params["lower_case"])
        return [BertTokenizer(TokenizerParam(vocab_or_file=tokens, do_lower_case=lower, strip_accents=lower),
                              need_token_type_ids_output=True)]  # (sic): True leaves token_type_ids out

    def files(self) -> list[str]:
        return [self.params["vocab"]]
