"""Generation: a decoder step run as an app runs it, and judged by the tokens it chooses.

Each held-out prompt is fed one token a call (or whole in one call, `prefill`), then the step's
own greedy choice (the argmax of its logits) is fed back for `steps` calls, its state (KV cache, recurrent state) carried from
call to call: through eager PyTorch and through the artifact's runtime, each from a fresh state.
What is compared is what the app shows: the token sequences (how many match, the step where
they first part), and the logits' error up to that step.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from pipelines.errors import PipelineError

from .fidelity import compare
from .streaming import Step, initial_state
from .tensors import NUMPY_DTYPES, integer_range


def check_inputs(cfg, io: Mapping[str, Any]) -> None:
    """Every input of the step is the token, the position or a state the step returns."""
    names = {spec["name"] for spec in io["inputs"]}
    carried = {s["input"] for s in io["state"]}
    for key in ("token", "position"):
        if cfg[key] is not None and cfg[key] not in names:
            raise PipelineError(f"part.generate.{key}={cfg[key]!r} is not an input of the part "
                                f"({', '.join(sorted(names))})", fix="name one of its inputs", stage="verify")
    if cfg.logits not in io["outputs"]:
        raise PipelineError(f"part.generate.logits={cfg.logits!r} is not an output of the part "
                            f"({', '.join(io['outputs'])})", fix="name the output that holds the logits",
                            stage="verify")
    other = names - carried - {cfg.token, cfg.position}
    if other:
        raise PipelineError(f"part.generate: input {', '.join(sorted(other))} is neither the token, the "
                            f"position nor a state the step returns", stage="verify",
                            fix="declare it as state (part.state: {input: output}) or as generate.position")
    if cfg.prefill:
        for spec in io["inputs"]:
            if spec["name"] in (cfg.token, cfg.position) and len(spec.get("dynamic") or {}) != 1:
                raise PipelineError(f"part.generate.prefill: input {spec['name']!r} needs one dynamic axis, the "
                                    f"prompt's length, to take a whole prompt in one call", stage="verify",
                                    fix=f"give it `dynamic: {{<axis>: length}}` (and `max`), or set "
                                        f"part.generate.prefill=false")


def _tokens(spec: Mapping[str, Any], values: list[int]) -> np.ndarray:
    """`values` (one, or a prompt along the spec's dynamic axis) as the input `spec` takes them."""
    dynamic = {int(axis) for axis in spec.get("dynamic") or {}}
    shape = [len(values) if axis in dynamic else size for axis, size in enumerate(spec["shape"])]
    if not dynamic:
        return np.full(shape, values[0], NUMPY_DTYPES[spec["dtype"]])
    return np.asarray(values, NUMPY_DTYPES[spec["dtype"]]).reshape(shape)


def prompts(cfg, io: Mapping[str, Any]) -> list[list[int]]:
    """The part's held-out prompts (`prompt_data`), else `cfg.prompts` seeded prompts of
    `cfg.prompt_length` token ids in the token input's [low, high)."""
    if cfg.get("prompt_data") is not None:
        from hydra.utils import instantiate

        given = [list(map(int, prompt)) for prompt in instantiate(cfg.prompt_data)]
        if not given or not all(given):
            raise PipelineError(f"part.generate.prompt_data ({cfg.prompt_data['_target_']}) gave no prompts",
                                fix="return a list of prompts, each a non-empty list of token ids", stage="verify")
        return given
    spec = next(s for s in io["inputs"] if s["name"] == cfg.token)
    rng = np.random.default_rng(cfg.seed)
    low, high = integer_range(spec)
    return [rng.integers(low, high, size=cfg.prompt_length).tolist() for _ in range(cfg.prompts)]


def greedy(step: Step, io: Mapping[str, Any], cfg, prompt: list[int],
           calls: list[tuple[int, float]] | None = None) -> tuple[list[int], list[np.ndarray]]:
    """The `cfg.steps` tokens the step chooses after the prompt, and the logits it chose them
    from; `calls` gets each call's (tokens fed, wall time)."""
    specs = {s["name"]: s for s in io["inputs"]}
    state, tokens, logits = initial_state(io), [], []
    fed, position = list(prompt), 0
    while len(tokens) < cfg.steps:
        # the prompt whole (prefill), else a token a call
        count = len(prompt) if cfg.prefill and position == 0 else 1
        positions = list(range(position, position + count))
        feed = {**state, cfg.token: _tokens(specs[cfg.token], fed[position: position + count])}
        if cfg.position is not None:
            feed[cfg.position] = _tokens(specs[cfg.position], positions)
        started = time.perf_counter()
        outputs = dict(zip(io["outputs"], step(feed)))
        if calls is not None:
            calls.append((count, time.perf_counter() - started))
        state = {s["input"]: outputs[s["output"]] for s in io["state"]}
        position += count
        if position >= len(prompt):  # the prompt's last token on: each call chooses the next
            # a copy: a runtime may hand back the same output buffer at every call
            scores = np.array(outputs[cfg.logits].reshape(-1, outputs[cfg.logits].shape[-1])[-1])
            logits.append(scores)
            tokens.append(int(np.argmax(scores)))
            fed.append(tokens[-1])
    return tokens, logits


GENERATION = "generation.npz"  # verify's prompts and eager's tokens and logits, for the devices


def verify_generation(cfg, tolerance, eager: Step, eager_io: Mapping[str, Any], reset: Callable[[], None],
                      artifact: Callable[[], Step], io: Mapping[str, Any], carried: int = 0,
                      saved: Path | None = None) -> dict[str, Any]:
    """Greedy generation from each prompt through eager (its buffers `reset()` first) and
    through the artifact, judged by judge_generation. `saved`: where to keep the prompts and
    eager's tokens and logits (load_generation reads them back for the target's devices)."""
    check_inputs(cfg, eager_io)
    expected = []
    for prompt in prompts(cfg, eager_io):
        reset()
        tokens, logits = greedy(eager, eager_io, cfg, prompt)
        expected.append({"prompt": prompt, "tokens": tokens, "logits": logits})
    if saved is not None:
        np.savez(saved, **{f"{k}/{key}": np.asarray(record[key]) for k, record in enumerate(expected)
                           for key in ("prompt", "tokens", "logits")})
    return judge_generation(cfg, tolerance, expected, artifact, io, carried)


def load_generation(path: Path) -> list[dict[str, Any]]:
    """Eager's generation as verify_generation saved it: per prompt, its tokens and logits."""
    records: dict[int, dict[str, Any]] = {}
    with np.load(path) as data:
        for name in data.files:
            index, _, key = name.partition("/")
            value = data[name]
            records.setdefault(int(index), {})[key] = list(value) if key == "logits" else value.tolist()
    return [records[k] for k in sorted(records)]


def judge_generation(cfg, tolerance, expected: list[dict[str, Any]], artifact: Callable[[], Step],
                     io: Mapping[str, Any], carried: int = 0) -> dict[str, Any]:
    """Each of eager's generations (`expected`) against the artifact's greedy run from the same
    prompt, each through `artifact()` (a step whose runtime state starts anew), token by token.
    Tokens must match at the precision's `min_top1_agreement` (every one where it sets none), and
    the logits until the first divergence stay within its `max_rel` where it sets one.
    `carried`: the bytes of state (KV cache) carried between calls, for the report."""
    results, prefill, decode = [], [], []
    for record in expected:
        prompt, tokens, logits = record["prompt"], record["tokens"], record["logits"]
        calls: list[tuple[int, float]] = []
        actual, actual_logits = greedy(artifact(), io, cfg, prompt, calls)
        # prefill: the prompt's calls (but the last of one-token calls: it chooses, as decode's do)
        split = 1 if cfg.prefill else len(prompt) - 1
        prefill += calls[:split]
        decode += calls[split:]
        differ = [k for k, (e, a) in enumerate(zip(tokens, actual)) if e != a]
        first = differ[0] if differ else None
        until = logits[: first + 1 if first is not None else None]  # the calls fed the same tokens
        results.append({
            "prompt": prompt, "eager": tokens, "artifact": actual, "first_divergence": first,
            "token_match": 1 - len(differ) / len(tokens),
            "max_rel_until_divergence": max(compare(e, a)["max_rel"] for e, a in
                                            zip(until, actual_logits[: len(until)])),
            "eager_min_margin_rel": min(_margin_rel(e) for e in logits),
            **(_parting(logits[first], actual_logits[first]) if first is not None else {}),
        })
    match = float(np.mean([r["token_match"] for r in results]))
    wanted = tolerance.min_top1_agreement if tolerance.min_top1_agreement is not None else 1.0
    diverged = [(k, r) for k, r in enumerate(results) if r["first_divergence"] is not None]
    reason, drift = "", max(r["max_rel_until_divergence"] for r in results)
    if tolerance.get("max_rel") is not None and not drift <= tolerance.max_rel:
        k = max(range(len(results)), key=lambda i: results[i]["max_rel_until_divergence"])
        reason = (f"greedy generation: prompt {k}'s logits are {drift:.2e} of their largest value off eager's "
                  f"> {tolerance.max_rel:g} ({match:.1%} of the tokens match)")
    elif match < wanted:
        k, worst = min(diverged, key=lambda kr: kr[1]["first_divergence"])
        reason = (f"greedy generation: {match:.1%} of the tokens match eager's < {wanted:.0%}; prompt {k} "
                  f"diverges at step {worst['first_divergence']} of {cfg.steps} (token {worst['artifact'][worst['first_divergence']]} "
                  f"for eager's {worst['eager'][worst['first_divergence']]}; logits {worst['max_rel_until_divergence']:.2e} "
                  f"of their largest value off eager until then; there eager's top two were "
                  f"{worst['eager_margin']:.2g} apart and the artifact's logits {worst['max_abs_there']:.2g} off)")
    return {"prompts": len(results), "steps": cfg.steps, "token_match": match,
            # timed in this verification (make bench times the artifact properly)
            "prefill_tokens_per_s": _rate(prefill), "decode_tokens_per_s": _rate(decode),
            "prefill": bool(cfg.prefill),
            "state_bytes": carried,
            "first_divergence": min((r["first_divergence"] for _, r in diverged), default=None),
            "max_rel_until_divergence": drift,
            # how near a tie eager came: a gap of its two best logits, of their largest value, below
            # the runtimes' rounding (fp32: ~1e-6) lets any CPU's kernels pick the other token
            "eager_min_margin_rel": min(r["eager_min_margin_rel"] for r in results),
            "per_prompt": results, "passed": not reason, "reason": reason}


def _rate(calls: list[tuple[int, float]]) -> float | None:
    """Tokens per second over (tokens, seconds) calls."""
    seconds = sum(s for _, s in calls)
    return sum(n for n, _ in calls) / seconds if seconds else None


def _margin_rel(scores: np.ndarray) -> float:
    """The gap between the two best logits of one step, of the largest |logit|."""
    values = np.asarray(scores, np.float64).ravel()
    top = np.sort(values)[-2:]
    return float((top[1] - top[0]) / max(np.abs(values).max(), np.finfo(np.float32).tiny))


def _parting(eager: np.ndarray, artifact: np.ndarray) -> dict[str, float]:
    """Where the two parted: how far apart eager's two best tokens were (a near-tie is parted by
    any rounding) and how far the artifact's logits were from eager's."""
    top = np.sort(np.asarray(eager, np.float64).ravel())[-2:]
    return {"eager_margin": float(top[1] - top[0]),
            "max_abs_there": float(np.abs(np.asarray(eager, np.float64) - np.asarray(artifact, np.float64)).max())}


def state_bytes(io: Mapping[str, Any], buffers: Mapping[str, Any]) -> int:
    """Bytes of the state carried between calls (a KV cache): the state inputs the part declares
    and the buffers its module updates (kept inside a .pte, I/O of an .onnx)."""
    declared = sum(int(np.prod(s["shape"])) * np.dtype(NUMPY_DTYPES[s["dtype"]]).itemsize for s in io["state"]
                   if "shape" in s)
    return declared + sum(b.numel() * b.element_size() for b in buffers.values())
