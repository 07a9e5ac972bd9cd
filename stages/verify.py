"""verify: run the artifact in its real runtime on held-out inputs and compare with eager PyTorch.

A part with state (buffers updated in forward, or declared state pairs) is also verified chunk by
chunk on a stream, its state carried as an app carries it (stages/support/streaming.py).
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np

from pipelines.errors import PipelineError, root_cause
from pipelines.logs import progress
from pipelines.memory import release
from pipelines.registry import StageContext, stage
from pipelines.versions import host_cpu, host_isa

from .support.fidelity import HELD_OUT, class_scores, judge, part_tolerance, save_held_out, verdict
from .formats import backend, format_code
from .support.tensors import as_examples, batch_axes, batch_count, batches, dataset_files, synthetic_examples


def _reads(view) -> list[str]:
    """The outside files verify reads: the part's eval data, a streamed signal file."""
    stream = view["verify"]["stream"]
    signal = [stream["file"]] if stream["signal"] == "file" and stream["file"] else []
    raw = dataset_files((view["part"].get("raw") or {}).get("eval_data"))
    return dataset_files(view["part"]["eval_data"]) + signal + raw


def _environment(view) -> dict[str, Any]:
    """What verify's figures depend on besides its inputs: this host's instruction set, and where
    it runs the artifact on its own fused kernels (a host of the target's isa) their CPU features,
    so a shared cache never gives one CPU's figures to another (verify_target takes them as a
    native device's)."""
    isa = host_isa()
    if isa not in list(view["target"]["isa"]):
        return {"isa": isa}
    return {"isa": isa, **{k: v for k, v in host_cpu().items() if k not in ("machine", "model", "cores")}}


@stage("verify", needs=("load_checkpoint", "clean_state_dict", "wrap", "quantize", "lower"),
       config=("verify", "precision", "format", "target.isa", "model.arch", "model.factory", "part"),
       code=format_code,
       reads=_reads, environment=_environment, artifacts=("verify.json", "test_data_set_*", "model.bpte*"))
def run(ctx: StageContext) -> dict:
    from .support.model_builder import as_step, load_part

    wrap, lower = ctx.input("wrap"), ctx.input("lower")
    eager_io = json.loads((wrap.dir / "io.json").read_text())  # the module's own inputs/outputs
    io = json.loads((lower.dir / "io.json").read_text())  # the artifact's: its state may be I/O
    clean = ctx.input("clean_state_dict")
    eager = load_part(ctx.cfg.model, ctx.cfg.part, clean.dir / clean.result["weights"],
                      ctx.input("load_checkpoint").result["config"], strict=clean.result["strict"])
    reset = _resetter(eager, eager_io)  # its loaded state, before any call changes it
    # on a host whose CPU the target does not include, the graph's own arithmetic, not this CPU's
    # fused kernels (x86 without VNNI saturates int8 pairs that wasm and arm64 never do)
    as_written = host_isa() not in list(ctx.cfg.target.isa)
    fmt = backend(ctx.cfg.format.name)
    artifact = fmt.load(lower.dir / lower.result["artifact"], io, as_written=as_written)
    tolerance = part_tolerance(ctx.cfg.precision, ctx.cfg.part)
    step = as_step(eager, eager_io["inputs"])  # without internal state, io has the same inputs
    # a module that updates its buffers is not a function of one input: only a stream tests it
    first, cases = None, None  # (a held-out batch, the artifact's outputs); [(feed, eager outputs)]
    if "processing" in io:  # raw inputs: the app's Python preprocessing, then eager, is the reference
        report, cases = _raw_report(ctx, io, step, artifact, lower.dir)
    elif not eager_io["internal_state"]:
        report, first = _held_out_report(ctx, io, step, artifact)
        cases = [(feed, step(feed)) for feed in _single_calls(first[0], io["inputs"])[:TEST_CASES]]
    else:
        report = {}
    # the artifact carries a few held-out cases and its own outputs for them, written at the end
    cases = _expected_cases(lower, artifact, cases, tolerance) if cases else None
    if eager_io["state"] or eager_io["internal_state"]:
        from .support.streaming import STREAM, verify_stream

        report["stream"] = verify_stream(ctx.cfg.verify.stream, tolerance, step, eager_io,
                                         reset, artifact, io, ctx.workdir / STREAM)
        report.setdefault("outputs", report["stream"]["outputs"])
    if ctx.cfg.part.generate is not None:
        from .support.generation import GENERATION, state_bytes, verify_generation

        inside = eager_io["internal_state"] and not io["state"]  # a .pte's buffers: reload to reset
        report["generation"] = verify_generation(
            ctx.cfg.part.generate, tolerance, step, eager_io, reset,
            (lambda: fmt.load(lower.dir / lower.result["artifact"], io, as_written=as_written)) if inside
            else (lambda: artifact), io,
            state_bytes(eager_io, {name: eager.get_buffer(name) for name in eager_io["internal_state"]}),
            ctx.workdir / GENERATION)
    report["passed"], report["reason"] = verdict(report, tolerance)
    mode = ctx.cfg.verify.diagnose
    if first and not io["state"] and (mode == "always" or mode == "on_failure" and not report["passed"]):
        from .support.diagnose import describe

        report["diagnosis"] = _diagnosis(ctx, eager, *first)
        if not report["passed"]:
            report["reason"] += f"; {describe(report['diagnosis'])}"
    report["runtime"], report["host_kernels"] = fmt.runtime(as_written), not as_written
    if cases:
        del eager, step, artifact  # a bundle copies the whole program: not beside two more copies
        release()
        report["test_cases"] = _write_cases(ctx, lower, io, cases)
    (ctx.workdir / "verify.json").write_text(json.dumps(report, indent=1))
    outputs = report["outputs"].values()
    acc, stream, generated = report.get("accuracy"), report.get("stream"), report.get("generation")
    report["summary"] = (("PASS" if report["passed"] else "FAIL")
                         + f" max_abs={max(o['max_abs'] for o in outputs):.2e}"
                         f" cos={min(o['cosine'] for o in outputs):.6f}"
                         + (f" acc {acc['eager']:.2%}->{acc['artifact']:.2%}" if acc else "")
                         + (f" | {stream['chunks']} chunks streamed: worst {stream['max_abs']:.2e},"
                            f" stateless would be {stream['stateless_baseline']['max_abs']:.2e}"
                            if stream else "")
                         + (f" | generation: {generated['token_match']:.1%} of {generated['prompts']}x"
                            f"{generated['steps']} greedy tokens match"
                            + (f", first divergence at step {generated['first_divergence']}"
                               if generated["first_divergence"] is not None else "") if generated else ""))
    return report


def _raw_report(ctx: StageContext, io, eager, artifact, lower_dir) -> tuple[dict[str, Any], list]:
    """Each raw held-out example through the app's steps (app_steps.onnx) and the artifact,
    against the part's raw.reference preprocessing then eager PyTorch and the same
    post-processing (stages/support/raw.py)."""
    import torch
    from omegaconf import OmegaConf

    from .processing import build
    from .support.raw import HELD_OUT_RAW, app_steps, judge_raw, raw_examples, reference, save_held_out

    raw, part = ctx.cfg.part.raw, ctx.cfg.part
    specs = [OmegaConf.to_container(s, resolve=True) for s in raw.inputs]
    examples, labels = raw_examples(raw, specs)
    app, prepare = app_steps(lower_dir, specs), reference(raw, specs)
    post = [build(s, f"part '{part.name}' raw.postprocess") for s in raw.postprocess]
    names = post[-1].outputs("pte") if post else [part.outputs[0]]
    label_names = next((s.params["labels"] for s in post if s.params.get("labels")), None)

    def reference_outputs(example) -> dict[str, np.ndarray]:
        outputs = eager(prepare(example))
        first = torch.from_numpy(outputs[0])
        with torch.no_grad():
            for step in post:
                first = step.torch()(first)
        values = {**dict(zip(names, [t.numpy() for t in (first if isinstance(first, tuple) else (first,))])),
                  **dict(zip(part.outputs[1:], outputs[1:]))}
        if "top_labels" in io["outputs"]:
            values["top_labels"] = np.asarray(label_names, dtype=object)[values["top_classes"]]
        return values

    feeds = [app(example) if app else example for example in progress(examples, len(examples), "verify")]
    actual = [dict(zip(io["outputs"], artifact(feed))) for feed in feeds]
    expected = [reference_outputs(example) for example in examples]
    save_held_out(ctx.workdir / HELD_OUT_RAW, feeds, expected, labels)
    processing = io["processing"]
    cases = [(feed, [out[n] for n in io["outputs"]]) for feed, out in zip(feeds[:TEST_CASES], expected)]
    return {"held_out": raw.eval_data["_target_"], "examples": len(examples),
            "compared_with": f"{raw.reference['_target_']} then eager PyTorch",
            "inside": processing["inside"], "in_app": processing["in_app"],
            **judge_raw(expected, actual, labels)}, cases


TEST_CASES = 3


def _expected_cases(lower, artifact, cases, tolerance) -> dict[str, Any]:
    """The first held-out examples, one call each, with the artifact's outputs as expected
    values and eager's for reference; where the precision sets no max_abs, judged to its max_rel
    (fp32, fp16) or 10% (int8) of the largest expected value, the atol a bundled runner needs. Or why
    there are none."""
    from .support.testcases import unbundlable

    if reason := unbundlable(lower.dir / lower.result["artifact"]):
        return {"skipped": reason}
    feeds = [feed for feed, _ in cases]
    expected = [artifact(feed) for feed in feeds]
    largest = max(float(np.abs(o).max(initial=0)) for outputs in expected for o in outputs if o.dtype.kind != "O")
    relative = tolerance.max_rel if tolerance.get("max_rel") is not None else 0.1
    bounds = {"max_abs": tolerance.max_abs if tolerance.max_abs is not None else float(f"{relative * largest:.3g}"),
              "min_cosine": tolerance.min_cosine}
    return {"feeds": feeds, "expected": expected, "eager": [eager for _, eager in cases], "bounds": bounds}


def _write_cases(ctx: StageContext, lower, io, cases: dict[str, Any]) -> dict[str, Any]:
    """The cases beside the artifact (copied into the run's artifacts/; stages/support/testcases.py:
    an .onnx's test_data_set_<i>/, a .pte's model.bpte); `make check-artifact` re-runs them."""
    from pipelines.digests import link_or_copy
    from .support.testcases import write

    if "skipped" in cases:
        ctx.log.info("    verify: %s", cases["skipped"])
        return {"cases": 0, "files": [], "skipped": cases["skipped"]}
    model = ctx.workdir / lower.result["artifact"]
    link_or_copy(lower.dir / lower.result["artifact"], model)
    try:
        files = write(model, io, cases["feeds"], cases["expected"], cases["eager"], cases["bounds"],
                      {"precision": ctx.cfg.precision.name, "format": ctx.cfg.format.name,
                       "target_isa": list(ctx.cfg.target.isa)})
    finally:
        model.unlink()  # the model itself is lower's; the cases go beside it in artifacts/
    return {"cases": len(cases["feeds"]), "files": files, "tolerance": cases["bounds"]}


def _diagnosis(ctx: StageContext, eager, feed, outputs) -> dict[str, Any]:
    """Per-layer errors of quantize's program on one held-out batch (stages/support/diagnose.py)."""
    from .support.diagnose import diagnose_program

    ctx.log.info("    verify: tracing the error to its layers")
    return diagnose_program(ctx, eager, feed, outputs)


def _held_out_report(ctx: StageContext, io, eager, artifact) -> tuple[dict[str, Any], tuple]:
    """Eager and artifact on the held-out examples, batch by batch; and the first batch with
    the artifact's outputs (for diagnosis)."""
    specs = io["inputs"]
    examples, labels, origin = _held_out(ctx, specs)
    size = ctx.cfg.verify.batch_size
    expected: list[list[np.ndarray]] = []
    actual: list[list[np.ndarray]] = []
    for batch in progress(batches(examples, specs, size), batch_count(examples, specs, size), "verify"):
        expected.append(eager(batch))
        actual.append(artifact(batch))
    report = {"held_out": origin, "examples": len(next(iter(examples.values()))),
              **judge(expected, actual, io["outputs"], class_scores(ctx.cfg.part, io), labels,
                    boxes=ctx.cfg.part.boxes)}
    save_held_out(ctx.workdir / HELD_OUT, examples, io["outputs"], expected, labels)
    return report, (next(batches(examples, specs, size)), actual[0])


def _single_calls(batch: dict[str, np.ndarray], specs) -> list[dict[str, np.ndarray]]:
    """A batch split into one-example calls along each input's batch axis (an LSTM state's is 1)."""
    axes = batch_axes(specs)
    if axes is None:  # batches(...) went one example at a time
        return [batch]
    count = next(iter(batch.values())).shape[axes[next(iter(batch))]]
    return [{name: np.take(array, [i], axis=axes[name]) for name, array in batch.items()} for i in range(count)]


def _resetter(module, io):
    """Puts the buffers forward updates back to their loaded values (a new stream)."""
    initial = {name: module.get_buffer(name).clone() for name in io["internal_state"]}

    def reset() -> None:
        for name, value in initial.items():
            module.get_buffer(name).copy_(value)

    return reset


def _held_out(ctx: StageContext, specs) -> tuple[dict[str, np.ndarray], np.ndarray | None, str]:
    """The part's eval data (never the calibration data), or seeded synthetic inputs."""
    data = ctx.cfg.part.eval_data
    if data:
        from hydra.utils import instantiate

        try:
            loaded = instantiate(data)
        except Exception as exc:
            raise PipelineError(f"eval_data {data['_target_']} failed: {root_cause(exc)}",
                                fix=f"it is called as {data['_target_']}(<its config keys>) and returns "
                                    '{"inputs": {input name: array}, "labels": array or absent}') from exc
        return as_examples(loaded["inputs"], specs, data["_target_"]), loaded.get("labels"), data["_target_"]
    cfg = ctx.cfg.verify
    return synthetic_examples(specs, cfg.samples, cfg.seed), None, f"synthetic (seed {cfg.seed})"
