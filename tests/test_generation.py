"""A decoder step verified by what it generates: greedy tokens through the artifact's runtime
against eager's, the first divergence and the logits' error until then."""
from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from pipelines.errors import PipelineError
from stages.support.generation import verify_generation

VOCAB = 8
IO = {"inputs": [{"name": "token", "shape": [1, 1], "dtype": "int64", "low": 0, "high": VOCAB}],
      "outputs": ["logits"], "state": [], "internal_state": []}
CFG = OmegaConf.create({"token": "token", "logits": "logits", "position": None, "prefill": False, "steps": 10,
                        "prompts": 2, "prompt_length": 3, "seed": 0})


def counting(flip_at: int | None = None):
    """A step whose next token is (token + 1) mod VOCAB; from call `flip_at` on it prefers +2."""
    calls = {"n": 0}

    def step(feed):
        calls["n"] += 1
        token = int(feed["token"].ravel()[0])
        logits = np.zeros((1, VOCAB), np.float32)
        shift = 2 if flip_at is not None and calls["n"] > flip_at else 1
        logits[0, (token + shift) % VOCAB] = 5.0
        logits[0, (token + 3 - shift) % VOCAB] = 4.9
        return [logits]

    return step


def tolerance(agreement):
    return OmegaConf.create({"min_top1_agreement": agreement})


def test_identical_generation_passes_and_says_so():
    report = verify_generation(CFG, tolerance(None), counting(), IO, lambda: None, counting, IO)
    assert report["passed"] and report["token_match"] == 1.0 and report["first_divergence"] is None
    assert report["per_prompt"][0]["eager"][:3] == [(report["per_prompt"][0]["prompt"][-1] + k) % VOCAB
                                                     for k in (1, 2, 3)]


def test_a_changed_token_fails_naming_the_step_where_generation_parted():
    flipped = lambda: counting(flip_at=2 + 5)  # noqa: E731  prompt's 3 calls, then 5 good tokens
    report = verify_generation(CFG, tolerance(None), counting(), IO, lambda: None, flipped, IO)
    assert not report["passed"] and report["first_divergence"] == 5
    assert "prompt 0 diverges at step 5 of 10" in report["reason"]
    assert "of the tokens match eager's < 100%" in report["reason"]
    loose = verify_generation(CFG, tolerance(0.4), counting(), IO, lambda: None, flipped, IO)
    assert loose["passed"]  # a stated match rate (the precision's min_top1_agreement)


def test_an_input_that_is_not_token_position_or_state_is_refused():
    io = {**IO, "inputs": [*IO["inputs"], {"name": "mask", "shape": [1, 1], "dtype": "int64"}]}
    with pytest.raises(PipelineError, match="input mask is neither the token, the position nor a state"):
        verify_generation(CFG, tolerance(None), counting(), io, lambda: None, counting, io)


def test_prefill_feeds_the_whole_prompt_in_one_call_then_a_token_a_call():
    """generate.prefill: the prompt along the token input's dynamic axis with its positions, once;
    the rate of prefill counts the prompt's tokens."""
    io = {"inputs": [{"name": "token", "shape": [1, 1], "dtype": "int64", "low": 0, "high": VOCAB,
                      "dynamic": {1: "length"}},
                     {"name": "position", "shape": [1], "dtype": "int64", "dynamic": {0: "length"}}],
          "outputs": ["logits"], "state": [], "internal_state": []}
    cfg = OmegaConf.merge(CFG, {"position": "position", "prefill": True})
    fed = []

    def step(feed):
        fed.append((feed["token"].tolist(), feed["position"].tolist()))
        return counting()({"token": feed["token"][:, -1:]})

    report = verify_generation(cfg, tolerance(None), step, io, lambda: None, lambda: step, io)
    prompt = report["per_prompt"][0]["prompt"]
    assert fed[0] == ([prompt], [0, 1, 2])  # eager's first call: the whole prompt
    assert fed[1] == ([[(prompt[-1] + 1) % VOCAB]], [3])  # then its own choice, at the next position
    assert len(fed) == 2 * 2 * 10  # eager and artifact, 2 prompts: one prefill + 9 decode calls each
    assert report["passed"] and report["prefill"] and report["prefill_tokens_per_s"] > 0
    with pytest.raises(PipelineError, match="input 'token' needs one dynamic axis"):
        verify_generation(cfg, tolerance(None), counting(), {**io, "inputs": [{**io["inputs"][0], "dynamic": {}},
                                                                              io["inputs"][1]]},
                          lambda: None, counting, io)


def test_the_zoo_generators_prefill_fills_the_cache_as_token_by_token_calls_do():
    """One call of the whole prompt leaves the logits (and so the next token) that a call per
    token does."""
    import torch

    from models.generator import Generator

    torch.manual_seed(0)
    model = Generator(width=32, heads=2, layers=2, max_len=8).eval()
    prompt = torch.tensor([[25, 3, 4, 5]])
    with torch.no_grad():
        whole = model(prompt, torch.arange(4))
        model.load_state_dict({k: torch.zeros_like(v) if "cache" in k else v for k, v in model.state_dict().items()})
        for k in range(4):
            one = model(prompt[:, k:k + 1], torch.tensor([k]))
    torch.testing.assert_close(whole, one, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["onnx", "pte"])
def test_a_decoder_step_generates_the_same_tokens_in_its_runtime(run_tiny, tmp_path, fmt):
    from tests.tiny import write_decoder_checkpoint

    run = run_tiny(f"format={fmt}", "calibration=synthetic", model="tiny_decoder",
                   checkpoint=write_decoder_checkpoint(tmp_path / "decoder.pt"))
    assert run.status == "pass", run.error
    generated = run.result("verify")["generation"]
    assert generated["prompts"] == 3 and generated["steps"] == 12
    assert generated["token_match"] == 1.0 and generated["first_divergence"] is None
    assert len(set(tuple(p["eager"]) for p in generated["per_prompt"])) > 1  # prompts lead apart
    assert "generation: 100.0% of 3x12 greedy tokens match" in run.result("verify")["summary"]
    assert generated["state_bytes"] == 32 * 4  # the recurrent state, (1, 32) float32
    assert generated["decode_tokens_per_s"] > 0 and generated["prefill_tokens_per_s"] > 0
    assert generated["eager_min_margin_rel"] > 1e-3  # tests/tiny.py sets the logits well apart


@pytest.mark.parametrize("fmt, target, device, mode", [
    ("onnx", "web", "chromium-wasm", "browser"),
    pytest.param("pte", "android", "cortex-a53", "emulated", marks=pytest.mark.slow)])  # 2.5 min emulated
def test_a_decoder_generates_eagers_tokens_on_the_targets_devices(run_tiny, tmp_path, fmt, target, device, mode):
    """verify's prompts decoded greedily on each device of the target, in its own runtime (the
    browser's onnxruntime-web, an emulated phone core), the device choosing every token."""
    from tests.tiny import write_decoder_checkpoint

    run = run_tiny(f"format={fmt}", f"target={target}", "calibration=synthetic", "verify.emulate=true",
                   model="tiny_decoder", checkpoint=write_decoder_checkpoint(tmp_path / "decoder.pt"))
    assert run.status == "pass", run.error
    on_device = run.result("verify_target")["devices"][device]
    assert on_device.get("mode") == mode and on_device["status"] == "pass", on_device.get("reason")
    generated, expected = on_device["generation"], run.result("verify")["generation"]
    assert generated["token_match"] == 1.0 and generated["prompts"] == 3 and generated["steps"] == 12
    assert [p["artifact"] for p in generated["per_prompt"]] == [p["eager"] for p in expected["per_prompt"]]
    assert "100% of 3x12 greedy tokens as eager's" in run.result("verify_target")["reason"]


def test_a_kv_cache_written_in_place_is_state_not_weights():
    """The buffers a cache write updates are state, and the size audit leaves them out of the
    weights."""
    import torch

    from models.generator import Generator
    from stages.support.model_builder import used_tensors
    from stages.support.state_io import mutated_buffers

    model = Generator(width=16, heads=2, layers=1, max_len=8).eval()
    program = torch.export.export(model, (torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long)))
    assert set(mutated_buffers(program)) == {"blocks.0.k_cache", "blocks.0.v_cache"}
    weights = sum(t.numel() for t in used_tensors(program, leave_out=set(mutated_buffers(program))))
    assert weights == sum(p.numel() for p in model.parameters())


@pytest.mark.slow
def test_the_zoo_generator_generates_eagers_tokens_in_every_cell(tmp_path):
    """fp32/fp16/int8/int4 x ONNX/PTE: every cell passes, its tokens matching eager's at the
    precision's min_top1_agreement; at fp32 and fp16 every greedy token is eager's."""
    import json
    import subprocess
    import sys

    from tests.conftest import NATIVE_ONLY, ROOT
    from tests.test_zoo_pipeline import zoo_config

    zoo_config("generator")
    result = subprocess.run([sys.executable, "run.py", "-m", "model=generator", "precision=fp32,fp16,int8,int4",
                             "format=onnx,pte", NATIVE_ONLY, f"cache.dir={tmp_path}/cache",
                             f"hydra.sweep.dir={tmp_path}/sweep"], cwd=ROOT, capture_output=True, text=True,
                            timeout=3600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for cell in sorted((tmp_path / "sweep").glob("generator_*")):
        verify = json.loads((cell / "artifacts" / "decoder_step" / "verify.json").read_text())
        assert verify["passed"], (cell.name, verify["reason"])
        if "_fp32_" in cell.name or "_fp16_" in cell.name:
            assert verify["generation"]["token_match"] == 1.0, cell.name


def test_the_zoo_generator_at_int4_generates_eagers_tokens_in_the_browser(tmp_path):
    """4-bit MatMulNBits weights with the KV cache as I/O, run by Chromium's onnxruntime-web
    (wasm), the browser choosing every token."""
    import json
    import subprocess
    import sys

    import onnx

    from tests.conftest import ROOT
    from tests.test_zoo_pipeline import zoo_config

    zoo_config("generator")
    run = tmp_path / "run"
    result = subprocess.run([sys.executable, "run.py", "model=generator", "precision=int4", "format=onnx",
                             "target=web", f"cache.dir={tmp_path}/cache", f"hydra.run.dir={run}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    part = run / "artifacts" / "decoder_step"
    assert (part / "verify_target.json").exists(), result.stdout[-3000:] + result.stderr[-3000:]
    graph = onnx.load(str(part / "model.onnx")).graph
    assert "MatMulNBits" in {node.op_type for node in graph.node}
    token = next(i for i in graph.input if i.name == "token")
    assert token.type.tensor_type.shape.dim[1].dim_param  # the prompt's length: prefill in one call
    browser = json.loads((part / "verify_target.json").read_text())["devices"]["chromium-wasm"]
    assert browser.get("mode") == "browser" and browser.get("passed"), browser.get("reason")
    generated = browser["generation"]
    assert generated["token_match"] == 1.0 and generated["prompts"] == 4 and generated["prefill"]
    # why no CPU or browser can change that verdict: eager's two best logits stay apart by more than
    # twice the 4-bit error (measured 0.60 against 0.12 of the largest logit)
    assert generated["eager_min_margin_rel"] > 2 * generated["max_rel_until_divergence"]


def test_a_transformers_llama_generates_eagers_tokens_in_both_runtimes(tmp_path):
    """corpus/conf/model/llama.yaml: transformers' LlamaForCausalLM as a decode step with its static
    cache (as I/O in .onnx, buffers in .pte), judged by greedy generation."""
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT
    from tests.test_corpus import CORPUS_CONF, ensure_corpus_deps

    ensure_corpus_deps()
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, "run.py", "-m", "recipe=corpus", f"hydra.searchpath=[file://{CORPUS_CONF}]", "model=llama",
         "precision=fp32", f"cache.dir={tmp_path}/cache",
         f"hydra.sweep.dir={sweep}"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert (sweep / "matrix.json").exists(), result.stdout[-3000:] + result.stderr[-3000:]
    for fmt in ("onnx", "pte"):
        verify = json.loads(next((sweep / f"llama_fp32_{fmt}").glob("**/verify.json")).read_text())
        assert verify["passed"], verify["reason"]
        generation = verify["generation"]
        assert generation["token_match"] == 1.0 and generation["prompts"] * generation["steps"] == 96
        assert generation["state_bytes"] == 16 * 1024 and "stream" in verify  # 2 layers x K, V x 2 heads x 32 x 16
        # random weights, yet no near-tie fp32 rounding (~1e-6 of the largest logit, on any CPU's
        # kernels) could break: measured 3.2e-4
        assert generation["eager_min_margin_rel"] > 1e-4
