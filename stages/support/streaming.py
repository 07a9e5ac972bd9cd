"""Streaming: a stateful part run chunk by chunk with its state carried from call to call, as an
app runs it; verified against eager PyTorch run the same way, on a deterministic signal.

A part's io lists its state as {input, output, shape, dtype, initial} entries (state as I/O);
state kept inside an artifact (a .pte's mutable buffers) is carried by the runtime itself.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from pipelines.errors import PipelineError

from .fidelity import check, compare, relative_to
from .tensors import NUMPY_DTYPES, integer_range

Step = Callable[[dict[str, np.ndarray]], list[np.ndarray]]  # feed -> outputs, in io order


def initial_state(io: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {s["input"]: (np.zeros(s["shape"]) if s["initial"] == "zeros" else np.asarray(s["initial"]))
            .astype(NUMPY_DTYPES[s["dtype"]]) for s in io["state"]}


def carry(step: Step, io: Mapping[str, Any], chunks: Iterable[dict[str, np.ndarray]],
          stateless: bool = False) -> list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """(feed, outputs by name) of each chunk in order, each feed holding the state the previous
    call returned; the initial state every time when stateless (what a stateless export does).
    A state input a chunk already holds (recorded data) is fed as it is."""
    state, runs = initial_state(io), []
    for chunk in chunks:
        feed = {**state, **chunk}
        outputs = dict(zip(io["outputs"], step(feed)))
        if not stateless:
            state = {s["input"]: outputs[s["output"]] for s in io["state"]}
        runs.append((feed, outputs))
    return runs


def signal_chunks(cfg, specs: list[Mapping[str, Any]]) -> list[dict[str, np.ndarray]]:
    """`cfg.chunks` consecutive chunks: float inputs carry the signal along their last axis,
    continuing from chunk to chunk; integer inputs seeded values in [low, high)."""
    rng = np.random.default_rng(cfg.seed)
    stacks = {}
    for spec in specs:
        shape, dtype = tuple(spec["shape"]), NUMPY_DTYPES[spec["dtype"]]
        if np.issubdtype(dtype, np.floating):
            wave = _signal(cfg, cfg.chunks * shape[-1], rng)
            values = np.broadcast_to(wave.reshape(cfg.chunks, *[1] * (len(shape) - 1), -1),
                                     (cfg.chunks, *shape))
        else:
            values = rng.integers(*integer_range(spec), size=(cfg.chunks, *shape))
        stacks[spec["name"]] = values.astype(dtype)
    return [{name: stack[k] for name, stack in stacks.items()} for k in range(cfg.chunks)]


def _signal(cfg, length: int, rng: np.random.Generator) -> np.ndarray:
    if cfg.signal == "sine":
        return cfg.amplitude * np.sin(2 * np.pi * cfg.frequency_hz * np.arange(length) / cfg.sample_rate)
    if cfg.signal == "noise":
        return cfg.amplitude * rng.standard_normal(length)
    path = Path(cfg.file or "")
    if not path.is_file():
        raise PipelineError(f"verify.stream.signal=file but verify.stream.file={cfg.file!r} is not a file",
                            fix="give a 1-D .npy signal in verify.stream.file")
    signal = np.load(path, allow_pickle=False).ravel()
    if len(signal) < length:
        raise PipelineError(f"{path} holds {len(signal)} samples; {cfg.chunks} chunks need {length}",
                            fix="give a longer signal or fewer verify.stream.chunks")
    return signal[:length]


STREAM = "stream.npz"  # verify's chunks and eager's outputs per chunk, for the other verifiers


def verify_stream(cfg, tolerance, eager: Step, eager_io: Mapping[str, Any], reset: Callable[[], None],
                  artifact: Step, io: Mapping[str, Any], saved: Path | None = None) -> dict[str, Any]:
    """Every chunk's outputs, artifact vs eager (buffers reset at the start), each within the
    tolerance; beside them what a stateless export would give on the same chunks. `saved`: where
    to keep the chunks and eager's outputs (load_stream reads them back)."""
    state_inputs = {s["input"] for s in eager_io["state"]}
    chunks = signal_chunks(cfg, [s for s in eager_io["inputs"] if s["name"] not in state_inputs])
    reset()
    expected = [out for _, out in carry(eager, eager_io, chunks)]
    actual = [out for _, out in carry(artifact, io, chunks)]
    if saved:
        np.savez(saved, **{f"{k}/chunk:{name}": v for k, chunk in enumerate(chunks) for name, v in chunk.items()},
                 **{f"{k}/eager:{name}": v for k, out in enumerate(expected) for name, v in out.items()})
    if io["state"]:  # fed the initial state every call, as the stateless export would be
        naive = [out for _, out in carry(artifact, io, chunks, stateless=True)]
    else:  # state inside the artifact: a stateless export equals eager restarted every call
        naive = [out for _, out in carry(lambda feed: (reset(), eager(feed))[1], eager_io, chunks)]
    names = eager_io["outputs"]
    baseline = [max(compare(e[n], b[n])["max_abs"] for n in names) for e, b in zip(expected, naive)]
    return {
        "signal": _describe(cfg),
        "state": [s["input"] for s in io["state"]] or f"inside the artifact: {eager_io['internal_state']}",
        **judge_stream(expected, actual, names, tolerance),
        "stateless_baseline": {"max_abs": max(baseline), "worst_chunk": int(np.argmax(baseline)),
                               "per_chunk_max_abs": baseline},
    }


def load_stream(path: Path) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """(chunks, eager's outputs per chunk) as verify_stream saved them."""
    chunks: dict[int, dict] = {}
    expected: dict[int, dict] = {}
    with np.load(path) as data:
        for key in data.files:
            index, _, rest = key.partition("/")
            kind, _, name = rest.partition(":")
            (chunks if kind == "chunk" else expected).setdefault(int(index), {})[name] = data[key]
    return [chunks[k] for k in sorted(chunks)], [expected[k] for k in sorted(expected)]


def judge_stream(expected: list[Mapping[str, np.ndarray]], actual: list[Mapping[str, np.ndarray]],
                 names: list[str], tolerance) -> dict[str, Any]:
    """Chunk by chunk, every output within the tolerance; the first chunk that is not is the reason."""
    per_chunk = [{n: compare(e[n], a[n]) for n in names} for e, a in zip(expected, actual)]
    scale = {n: max(float(np.abs(e[n]).max(initial=0.0)) for e in expected) for n in names}
    for chunk in per_chunk:  # relative to the stream's scale: a chunk near zero is not all error
        for n, m in chunk.items():
            m["max_rel"] = relative_to(m["max_abs"], scale[n])
    errors = [max(m["max_abs"] for m in chunk.values()) for chunk in per_chunk]
    verdicts = [check({"outputs": chunk}, tolerance) for chunk in per_chunk]
    failed = next((k for k, (ok, _) in enumerate(verdicts) if not ok), None)
    return {
        "chunks": len(expected), "per_chunk_max_abs": errors, "worst_chunk": int(np.argmax(errors)),
        "max_abs": max(errors),
        "outputs": {n: compare(np.stack([e[n] for e in expected]), np.stack([a[n] for a in actual]))
                    for n in names},
        "passed": failed is None,
        "reason": "" if failed is None else f"streaming chunk {failed}/{len(expected)}: {verdicts[failed][1]}",
    }


def _describe(cfg) -> str:
    if cfg.signal == "sine":
        return f"sine {cfg.frequency_hz:g} Hz at {cfg.sample_rate} Hz, amplitude {cfg.amplitude:g}"
    if cfg.signal == "noise":
        return f"gaussian noise, amplitude {cfg.amplitude:g}, seed {cfg.seed}"
    return f"file {cfg.file}"
