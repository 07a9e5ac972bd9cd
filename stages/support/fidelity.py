"""How close an artifact's outputs are to eager PyTorch's, and whether that is close enough.

Shared by every verifier (the host runtime in verify, the target's own runtime in verify_target,
a stream in streaming): the same comparisons against the same tolerances.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np


HELD_OUT = "held_out.npz"  # verify's held-out inputs, eager outputs and labels, for the other verifiers


def save_held_out(path, examples, outputs, expected, labels) -> None:
    """The held-out examples, eager outputs (joined batches) and labels, as load_held_out reads them."""
    arrays = {f"input:{name}": array for name, array in examples.items()}
    arrays.update({f"eager:{name}": np.concatenate([e[i] for e in expected]) for i, name in enumerate(outputs)})
    np.savez(path, **arrays, **({"labels": labels} if labels is not None else {}))


def load_held_out(path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray | None]:
    """(examples by input, eager outputs by name, labels or None) that verify saved."""
    with np.load(path) as data:
        inputs = {k.split(":", 1)[1]: data[k] for k in data.files if k.startswith("input:")}
        eager = {k.split(":", 1)[1]: data[k] for k in data.files if k.startswith("eager:")}
        return inputs, eager, data["labels"] if "labels" in data.files else None


def judge(expected: list[list[np.ndarray]], actual: list[list[np.ndarray]], outputs: list[str],
          scores: Mapping[str, int | None], labels: np.ndarray | None,
          boxes: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Batch-by-batch outputs compared output by output; for the outputs that are class scores,
    top-1 agreement with eager on their class axis (every position of a dense map, and the maps'
    mean IoU); the IoU of the boxes the part's `boxes.decode` makes of both sides' outputs;
    accuracy of the first output when there are labels."""
    joined = {name: (np.concatenate([e[i] for e in expected]), np.concatenate([a[i] for a in actual]))
              for i, name in enumerate(outputs)}
    report: dict[str, Any] = {"outputs": {name: compare(*pair) for name, pair in joined.items()}}
    layouts = {name: score_layout(joined[name][0], axis) for name, axis in scores.items()}
    layouts = {name: layout for name, layout in layouts.items() if layout is not None}
    if layouts:
        report["scores"] = layouts
        report["top1_agreement"] = {name: top1_agreement(*joined[name], layout["axis"])
                                    for name, layout in layouts.items()}
        maps = {name: map_iou(*joined[name], layout["axis"]) for name, layout in layouts.items() if layout["map"]}
        if maps:
            report["map_iou"] = maps
    if boxes:
        report["boxes"] = box_agreement({n: e for n, (e, _) in joined.items()},
                                        {n: a for n, (_, a) in joined.items()}, boxes)
    if labels is not None:
        report["accuracy"] = {**classification(*joined[outputs[0]], labels), "output": outputs[0]}
    return report


def box_agreement(eager: Mapping[str, np.ndarray], artifact: Mapping[str, np.ndarray],
                  boxes: Mapping[str, Any]) -> dict[str, Any]:
    """The app's decode step (`boxes.decode`: outputs -> {"boxes": (N, K, 4) x1 y1 x2 y2,
    "scores": (N, K)}) on both sides; the IoU of each of eager's `top` best boxes per example
    with the artifact's box at the same place (anchor), and the share at IoU >= 0.5."""
    from hydra.utils import instantiate

    from pipelines.errors import PipelineError, root_cause

    decode = dict(boxes["decode"])
    try:
        mine, theirs = instantiate(decode, outputs=dict(eager)), instantiate(decode, outputs=dict(artifact))
    except Exception as exc:
        raise PipelineError(f"part.boxes.decode {decode.get('_target_')} failed: {root_cause(exc)}",
                            fix=f"it is called as {decode.get('_target_')}(outputs={{output name: array}}, "
                                "<its config keys>) and returns {'boxes': (N, K, 4), 'scores': (N, K)}") from exc
    top = min(int(boxes.get("top", 50)), mine["scores"].shape[1])
    best = np.argsort(-mine["scores"], axis=1)[:, :top]
    pick = lambda decoded: np.take_along_axis(decoded["boxes"], best[..., None], axis=1)  # noqa: E731
    iou = _iou(pick(mine), pick(theirs))
    return {"decode": decode.get("_target_"), "top": top, "mean_iou": float(iou.mean()),
            "matched": float((iou >= 0.5).mean())}


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes (..., 4) as x1, y1, x2, y2, pairwise along the leading dims."""
    low, high = np.maximum(a[..., :2], b[..., :2]), np.minimum(a[..., 2:], b[..., 2:])
    inter = np.clip(high - low, 0, None).prod(-1)
    area = lambda box: np.clip(box[..., 2:] - box[..., :2], 0, None).prod(-1)  # noqa: E731
    union = area(a) + area(b) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 1.0)


def compare(expected: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    """max abs, max abs relative to the largest expected magnitude, mean abs and cosine
    similarity of two outputs (float64 arithmetic)."""
    e = expected.astype(np.float64).ravel()
    a = actual.astype(np.float64).ravel()
    if e.shape != a.shape:
        return {"max_abs": float("inf"), "max_rel": float("inf"), "mean_abs": float("inf"), "cosine": 0.0,
                "shape_mismatch": [list(expected.shape), list(actual.shape)]}
    diff = np.abs(e - a)
    norm = np.linalg.norm(e) * np.linalg.norm(a)
    cosine = float(e @ a / norm) if norm > 0 else float(np.array_equal(e, a))
    worst = float(diff.max(initial=0.0))
    found = {"max_abs": worst, "max_rel": relative_to(worst, float(np.abs(e).max(initial=0.0))),
             "mean_abs": float(diff.mean()) if diff.size else 0.0, "cosine": cosine}
    if _integral(expected) and _integral(actual):  # token ids, class indices: equal or not
        differ = np.flatnonzero(e != a)
        found["exact_match"] = 1.0 - differ.size / max(e.size, 1)
        found["first_mismatch"] = [int(i) for i in np.unravel_index(differ[0], expected.shape)] if differ.size else None
    return found


def _integral(values: np.ndarray) -> bool:
    return np.issubdtype(values.dtype, np.integer) or values.dtype == np.bool_


def relative_to(error: float, scale: float) -> float:
    """error / scale, 0 for no error, inf for an error on an all-zero output."""
    return 0.0 if error == 0 else error / scale if scale > 0 else float("inf")


SCORE_NAMES = re.compile(r"logit|score|prob", re.IGNORECASE)


def class_scores(part: Mapping[str, Any], io: Mapping[str, Any]) -> dict[str, int | None]:
    """The outputs that are scores over classes, each with its declared class axis (None: inferred
    from the output's rank). The part's `scores` (a list of names, or {name: {axis: 1}}), else the
    outputs named like logits/scores/probs."""
    declared = part.get("scores")
    if declared is None:
        declared = [n for n in io["outputs"] if SCORE_NAMES.search(n)]
    if isinstance(declared, Mapping):
        axes = {str(name): _declared_axis(name, spec) for name, spec in declared.items()}
    else:
        axes = {str(name): None for name in declared}
    return {name: axis for name, axis in axes.items() if name in io["outputs"]}


def _declared_axis(name: str, spec: Any) -> int | None:
    from pipelines.errors import PipelineError

    if spec is None or (isinstance(spec, Mapping) and set(spec) <= {"axis"}
                        and isinstance(spec.get("axis"), (int, type(None)))):
        return (spec or {}).get("axis")
    raise PipelineError(f"part.scores.{name}: {spec!r} is not a score layout",
                        fix=f"write scores: {{{name}: {{axis: 1}}}} (the axis of its classes), or a list of names")


def score_layout(eager: np.ndarray, axis: int | None) -> dict[str, Any] | None:
    """Where an output's classes are: the declared axis, else the last one up to rank 3 ((N, C),
    (N, T, C) sequences) and axis 1 from rank 4 (PyTorch's channels-first maps, (N, C, H, W)).
    None when that axis holds fewer than two classes (nothing to agree on)."""
    rank = eager.ndim
    how = "declared" if axis is not None else f"inferred from rank {rank}"
    axis = (1 if rank >= 4 else -1) if axis is None else int(axis)
    if rank < 2 or not -rank <= axis < rank or eager.shape[axis] < 2:
        return None
    axis %= rank
    return {"axis": axis, "classes": int(eager.shape[axis]), "how": how,
            "positions": int(np.prod(eager.shape[1:]) // eager.shape[axis]), "map": rank >= 3 and axis < rank - 1}


def top1_agreement(expected: np.ndarray, actual: np.ndarray, axis: int = -1) -> float:
    """How often artifact and eager pick the same class (argmax on the class axis, every position)."""
    return float((expected.argmax(axis) == actual.argmax(axis)).mean())


def map_iou(expected: np.ndarray, actual: np.ndarray, axis: int) -> float:
    """Mean over the classes eager's maps predict anywhere of the IoU between eager's and the
    artifact's per-position argmax masks (a segmentation map's mIoU, eager as the ground truth)."""
    eager, artifact = expected.argmax(axis), actual.argmax(axis)
    ious = [np.logical_and(eager == c, artifact == c).sum() / np.logical_or(eager == c, artifact == c).sum()
            for c in np.unique(eager)]
    return float(np.mean(ious))


def classification(expected: np.ndarray, actual: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Test-set accuracy of eager and artifact, and how often their top-1 agree."""
    return accuracy(expected.reshape(len(labels), -1).argmax(axis=1),
                    actual.reshape(len(labels), -1).argmax(axis=1), labels)


def accuracy(eager_top1: np.ndarray, artifact_top1: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy of each side's predicted classes, and how often they agree."""
    return {"eager": float((eager_top1 == labels).mean()),
            "artifact": float((artifact_top1 == labels).mean()),
            "top1_agreement": float((eager_top1 == artifact_top1).mean())}


def part_tolerance(precision, part):
    """The precision's tolerance with the fields the part overrides at that precision."""
    from omegaconf import OmegaConf

    override = (part.get("tolerance") or {}).get(precision.name) or {}
    mine = {key: override[key] for key in override if not OmegaConf.is_missing(override, key)}
    return OmegaConf.merge(precision.tolerance, mine)


def verdict(report: dict[str, Any], tol) -> tuple[bool, str]:
    """A verification's pass and reason: the held-out outputs, then for a generator what it
    generates (its stream of random tokens is reported beside, not judged), else a stateful
    part's stream."""
    passed, reason = check(report, tol) if "held_out" in report else (True, "")
    kind = "generation" if "generation" in report else "stream"
    if passed and kind in report:
        passed, reason = report[kind]["passed"], report[kind]["reason"]
    return passed, reason


def check(report: dict[str, Any], tol) -> tuple[bool, str]:
    """Every configured tolerance, on every output; the first one missed is the reason."""
    for name, m in report["outputs"].items():
        if "shape_mismatch" in m:
            return False, f"output '{name}' has shape {m['shape_mismatch'][1]}, eager gives {m['shape_mismatch'][0]}"
        if "exact_match" in m:  # integers are judged equal or not, never by closeness
            wanted = tol.min_top1_agreement if tol.min_top1_agreement is not None else 1.0
            if m["exact_match"] < wanted:
                return False, (f"output '{name}' (integers) equals eager's at {m['exact_match']:.2%} of its "
                               f"values < {wanted:.0%}; the first differs at index {m['first_mismatch']}")
            continue
        if tol.max_abs is not None and not m["max_abs"] <= tol.max_abs:
            return False, f"output '{name}' max abs error {m['max_abs']:.3g} > {tol.max_abs:g}"
        if tol.get("max_rel") is not None and not m.get("max_rel", 0.0) <= tol.max_rel:
            return False, (f"output '{name}' max abs error {m['max_abs']:.3g} is {m['max_rel']:.2e} of its "
                           f"largest value > {tol.max_rel:g}")
        if tol.mean_abs is not None and not m["mean_abs"] <= tol.mean_abs:
            return False, f"output '{name}' mean abs error {m['mean_abs']:.3g} > {tol.mean_abs:g}"
        if tol.min_cosine is not None and not m["cosine"] >= tol.min_cosine:
            return False, f"output '{name}' cosine {m['cosine']:.6f} < {tol.min_cosine:g}"
    acc = report.get("accuracy")
    if acc and tol.max_accuracy_drop is not None:
        drop = (acc["eager"] - acc["artifact"]) * 100
        if drop > tol.max_accuracy_drop:
            return False, f"accuracy drops {drop:.2f} points > {tol.max_accuracy_drop:g}"
    agreement = dict(report.get("top1_agreement") or {})
    if acc:
        agreement.setdefault(acc["output"], acc["top1_agreement"])
    layouts = report.get("scores") or {}
    for name, value in agreement.items():
        if tol.min_top1_agreement is not None and value < tol.min_top1_agreement:
            where = _positions(layouts.get(name))
            return False, (f"output '{name}' top-1 agreement with eager {value:.2%}{where} < "
                           f"{tol.min_top1_agreement:.0%}")
    found = report.get("boxes")
    if found and tol.get("min_box_iou") is not None and found["mean_iou"] < tol.min_box_iou:
        return False, (f"the decoded boxes' mean IoU with eager's {found['mean_iou']:.2%} (top {found['top']} "
                       f"per example, {found['matched']:.0%} at IoU >= 0.5) < {tol.min_box_iou:.0%}")
    for name, value in (report.get("map_iou") or {}).items():
        if tol.get("min_map_iou") is not None and value < tol.min_map_iou:
            return False, (f"output '{name}' mean IoU of its class maps with eager's {value:.2%} < "
                           f"{tol.min_map_iou:.0%}")
    return True, ""


def _positions(layout: Mapping[str, Any] | None) -> str:
    if not layout or layout["positions"] == 1:
        return ""
    return f" (per position, {layout['positions']} per sample, classes on axis {layout['axis']})"
