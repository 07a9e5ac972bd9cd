"""Raw inputs end to end: what an app has (image bytes, a waveform, a sentence), its Python
preprocessing (the part's raw.reference) then eager PyTorch, against the artifact that takes the
raw input itself (with app_steps.onnx first when some steps stay in the app)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from pipelines.errors import PipelineError, root_cause

from .fidelity import accuracy, compare

Feed = dict[str, np.ndarray]


def raw_examples(raw, specs: list[Mapping[str, Any]], count: int | None = None) -> tuple[list[Feed], Any]:
    """The held-out raw examples (the first `count`), each a feed of arrays: bytes as uint8 [n],
    a sentence as a string [1], numbers in their spec's shape; and the labels (or None)."""
    from hydra.utils import instantiate

    target = raw.eval_data["_target_"]
    try:
        data = instantiate(raw.eval_data)
    except Exception as exc:
        raise PipelineError(f"raw.eval_data {target} failed: {root_cause(exc)}",
                            fix=f"it is called as {target}(<its config keys>) and returns "
                                '{"inputs": {raw input: examples}, "labels": array or absent}') from exc
    columns = {spec["name"]: list(data["inputs"][spec["name"]]) for spec in specs
               if spec["name"] in data["inputs"]}
    if len(columns) != len(specs):
        raise PipelineError(f"raw.eval_data {target} gives inputs {sorted(data['inputs'])}, the part's "
                            f"raw inputs are {[s['name'] for s in specs]}", fix="name them alike")
    total = min(len(column) for column in columns.values())
    examples = [{spec["name"]: _array(columns[spec["name"]][i], spec) for spec in specs}
                for i in range(total if count is None else min(count, total))]
    labels = data.get("labels")
    return examples, None if labels is None else np.asarray(labels)[:len(examples)]


def _array(value: Any, spec: Mapping[str, Any]) -> np.ndarray:
    if spec["dtype"] == "string":
        return np.array([str(np.asarray(value).reshape(-1)[0]) if not isinstance(value, str) else value],
                        dtype=object).reshape(spec["shape"])
    if isinstance(value, (bytes, bytearray)):
        return np.frombuffer(bytes(value), np.uint8)
    return np.asarray(value).astype(spec["dtype"]).reshape(
        [s for i, s in enumerate(np.asarray(value).shape)] if spec.get("dynamic") else spec["shape"])


def reference(raw, specs: list[Mapping[str, Any]]) -> Callable[[Feed], Feed]:
    """The app's Python preprocessing: raw.reference's callable, given each raw input as the
    app holds it (bytes, str or array) in spec order, returning {part input: array}."""
    from hydra.utils import get_method

    entry = dict(raw.reference)
    target = entry.pop("_target_")
    function = get_method(target)

    def run(feed: Feed) -> Feed:
        values = [_as_app_value(feed[spec["name"]], spec) for spec in specs]
        try:
            return {name: np.asarray(value) for name, value in function(*values, **entry).items()}
        except Exception as exc:
            raise PipelineError(f"raw.reference {target} failed: {root_cause(exc)}",
                                fix=f"it is called as {target}(<one raw example per raw input>) and "
                                    "returns {part input: array of the part's input shape}") from exc

    return run


def _as_app_value(array: np.ndarray, spec: Mapping[str, Any]) -> Any:
    if spec["dtype"] == "string":
        return str(array.reshape(-1)[0])
    if spec["dtype"] == "uint8" and spec.get("dynamic"):
        return array.tobytes()
    return array


def predicted_classes(outputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """Each example's class: the post-processing's top class when it gives one, else the argmax of
    the first output."""
    for name in ("top_classes", "top_class"):
        if name in outputs:
            return outputs[name].reshape(len(outputs[name]), -1)[:, 0]
    first = next(iter(outputs.values()))
    return first.reshape(len(first), -1).argmax(axis=1)


def judge_raw(expected: list[dict[str, np.ndarray]], actual: list[dict[str, np.ndarray]],
              labels: np.ndarray | None) -> dict[str, Any]:
    """Float outputs by their error; the top class (and its label) by agreement, not the ranks
    below it; accuracy of both sides with labels."""
    joined = {name: (np.concatenate([e[name] for e in expected]), np.concatenate([a[name] for a in actual]))
              for name in actual[0] if name in expected[0]}
    report: dict[str, Any] = {"outputs": {n: compare(*pair) for n, pair in joined.items()
                                          if pair[0].dtype.kind == "f"}}
    eager, artifact = (predicted_classes({n: pair[side] for n, pair in joined.items()}) for side in (0, 1))
    report["top1_agreement"] = {"predicted class": float((eager == artifact).mean()),
                                **{n: float((pair[0][..., 0] == pair[1][..., 0]).mean())
                                   for n, pair in joined.items() if pair[0].dtype.kind == "O"}}
    if labels is not None:
        report["accuracy"] = {**accuracy(eager, artifact, labels), "output": "predicted class"}
    return report


def app_steps(directory: Path, raw_specs: list[Mapping[str, Any]]) -> Callable[[Feed], Feed] | None:
    """app_steps.onnx beside an artifact, as a feed -> feed function (None when there is none)."""
    path = directory / "app_steps.onnx"
    if not path.exists():
        return None
    import onnx

    from ..formats import onnx as onnx_backend

    names = [value.name for value in onnx.load(str(path), load_external_data=False).graph.output]
    run = onnx_backend.load(path, {"inputs": raw_specs, "outputs": names})
    return lambda feed: dict(zip(names, run(feed)))


HELD_OUT_RAW = "held_out_raw.npz"  # verify's raw-mode feeds (after the app's steps), eager outputs, labels


def save_held_out(path: Path, feeds: list[Feed], expected: list[dict[str, np.ndarray]], labels) -> None:
    """Ragged feeds one array each; strings as fixed-width unicode, so no pickle is needed."""
    arrays = {f"feed{i}:{n}": _storable(a) for i, feed in enumerate(feeds) for n, a in feed.items()}
    arrays.update({f"eager{i}:{n}": _storable(a) for i, out in enumerate(expected) for n, a in out.items()})
    np.savez(path, **arrays, **({"labels": labels} if labels is not None else {}))


def load_held_out(path: Path) -> tuple[list[Feed], list[dict[str, np.ndarray]], np.ndarray | None]:
    with np.load(path) as data:
        feeds: dict[int, Feed] = {}
        eager: dict[int, dict[str, np.ndarray]] = {}
        for key in data.files:
            if key == "labels":
                continue
            kind, name = key.split(":", 1)
            target = feeds if kind.startswith("feed") else eager
            value = data[key]
            target.setdefault(int(kind.lstrip("feedagr")), {})[name] = \
                value.astype(object) if value.dtype.kind == "U" else value
        labels = data["labels"] if "labels" in data.files else None
    return [feeds[i] for i in sorted(feeds)], [eager[i] for i in sorted(eager)], labels


def _storable(array: np.ndarray) -> np.ndarray:
    return array.astype(str) if array.dtype.kind == "O" else array


def step_costs(raw, specs: list[Mapping[str, Any]], example: Feed, where: Mapping[str, str], cfg) -> list[dict]:
    """What each processing step costs, measured on its ONNX form in onnxruntime: the bytes its
    graph adds and the p50 milliseconds it adds to one raw example (growing prefixes of the
    preprocessing, timed one after the other; post-processing on scores of the labels' width)."""
    import onnx

    from ..formats import onnx as onnx_backend
    from ..processing import build, onnx_model
    from . import timing

    def cost(model, feed) -> tuple[int, float]:
        path = Path(timing.LOCK.parent) / f"step-cost-{id(model)}.onnx"
        onnx.save_model(model, str(path))
        try:
            run = onnx_backend.load(path, {"inputs": [], "outputs": []}, threads=cfg.threads)
            return len(model.SerializeToString()), timing.measure(lambda: run(feed), cfg)["p50_ms"]
        finally:
            path.unlink(missing_ok=True)

    rows, before = [], (len(onnx_model(specs, [], []).SerializeToString()), 0.0)
    pre = [build(s, "raw.preprocess") for s in raw.preprocess]
    for k in range(1, len(pre) + 1):
        now = cost(onnx_model(specs, pre[:k], []), example)
        rows.append({"step": pre[k - 1].describe(), "where": where.get(pre[k - 1].describe(), "inside"),
                     "bytes": now[0] - before[0], "p50_ms": round(now[1] - before[1], 4)})
        before = now
    post = [build(s, "raw.postprocess") for s in raw.postprocess]
    width = next((len(s.params["labels"]) for s in post if s.params.get("labels")), None)
    if post and width:
        scores = {"name": "scores", "shape": [1, width], "dtype": "float32", "dynamic": {}}
        feed = {"scores": np.linspace(-1, 1, width, dtype=np.float32)[None]}
        before = (len(onnx_model([scores], [], []).SerializeToString()), 0.0)
        for k in range(1, len(post) + 1):
            now = cost(onnx_model([scores], post[:k], []), feed)
            rows.append({"step": post[k - 1].describe(), "where": "inside", "bytes": now[0] - before[0],
                         "p50_ms": round(now[1] - before[1], 4)})
            before = now
    return rows
