"""precision=int4: block-wise 4-bit Linear and embedding weights in both formats, run in their
real runtimes, judged against eager and audited for 4-bit bytes."""
from __future__ import annotations

import numpy as np
import pytest

from pipelines.errors import PipelineError
from stages.formats.schemes import check
from tests.test_schemes import root
from tests.tiny import write_word_checkpoint

WORDS = ("precision=int4",)


@pytest.fixture
def words(tmp_path):
    return write_word_checkpoint(tmp_path / "words.pt")


@pytest.mark.parametrize("fmt", ["onnx", "pte"])
def test_int4_quantizes_linear_layers_and_tables_and_matches_eager(run_tiny, words, fmt):
    run = run_tiny(*WORDS, f"format={fmt}", "calibration=synthetic", model="tiny_words", checkpoint=words)
    assert run.status == "pass", run.error
    method = run.result("quantize")["method"]
    assert "4-bit weights in groups of 32" in method and "2 " in method and "1 embedding tables" in method
    audit = run.result("size_audit")
    assert audit["passed"], audit["reason"]
    assert audit["weight_share_by_dtype"]["int4"] > 0.6  # the rest: scales and biases
    assert audit["file_bytes"] < 0.5 * audit["fp32_parameter_bytes"]
    verify = run.result("verify")
    assert verify["passed"] and min(o["cosine"] for o in verify["outputs"].values()) >= 0.95


@pytest.mark.parametrize("fmt", ["onnx", "pte"])
def test_int4_leaves_narrow_layers_float_and_names_them(run_tiny, fmt):
    """TinyNet's first layer reads 16 features: not a whole group of 32. It stays float, the
    method says so, and the audit fails on the float bytes it leaves rather than passing a file
    that is mostly fp32."""
    run = run_tiny(*WORDS, f"format={fmt}")
    assert "float where the width is not a multiple of 32: body.0" in run.result("quantize")["method"]
    assert run.status == "fail" and "[size_audit]" in run.error and "int4 holds only" in run.error


@pytest.mark.parametrize("fmt", ["onnx", "pte"])
def test_int4_with_no_layer_it_applies_to_fails_in_quantize_naming_the_layers(run_tiny, fmt):
    run = run_tiny(*WORDS, f"format={fmt}", "precision.options.group_size=64")
    assert run.status == "fail" and "[quantize]" in run.error
    assert "no Linear (MatMul) or embedding weight" in run.error
    assert "body.0, body.2 have an input width that is not a multiple of group_size=64" in run.error


def test_a_group_size_the_kernels_do_not_take_is_refused_before_any_stage():
    with pytest.raises(PipelineError) as caught:
        check(root("int4", "onnx", group_size=24))
    assert "group_size=24 is not one of 32, 64, 128, 256" in str(caught.value)
    assert caught.value.stage == "config"
    check(root("int4", "pte", group_size=64, embeddings=False))


def test_stored_bytes_of_a_four_bit_tensor_count_half_a_byte_a_value():
    import torch
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    from stages.formats.pte import _stored

    table = torch.nn.Embedding(64, 32)
    quantize_(table, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)),
              filter_fn=lambda *_: True)
    stored = dict(_stored(table.weight))
    assert stored["int4"] == 64 * 32 // 2
    assert np.isclose(sum(stored.values()), 64 * 32 / 2 + 64 * 4 * 2, rtol=0.5)


@pytest.mark.parametrize("precision", ["int8", "int8_dynamic"])
def test_int8_pte_holds_its_embedding_tables_in_int8(run_tiny, words, precision):
    """XNNPACKQuantizer leaves embedding tables float; the int8 .pte stores them int8 (torchao,
    ExecuTorch's embedding_byte kernel), so a language model's file shrinks as its audit says."""
    run = run_tiny(f"precision={precision}", "format=pte", "calibration=synthetic", model="tiny_words",
                   checkpoint=words)
    assert run.status == "pass", run.error
    assert "1 embedding tables int8" in run.result("quantize")["method"]
    audit = run.result("size_audit")
    assert audit["weight_share_by_dtype"].get("float32", 0) < 0.25
    assert "the app must link ExecuTorch's quantized kernels" in " ".join(run.result("lower")["warnings"])
