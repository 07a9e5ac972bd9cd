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
          scores: list[str], labels: np.ndarray | None) -> dict[str, Any]:
    """Batch-by-batch outputs compared output by output; top-1 agreement of the outputs that are
    class scores; accuracy of the first output when there are labels."""
    joined = {name: (np.concatenate([e[i] for e in expected]), np.concatenate([a[i] for a in actual]))
              for i, name in enumerate(outputs)}
    report: dict[str, Any] = {"outputs": {name: compare(*pair) for name, pair in joined.items()}}
    agreement = {name: top1_agreement(*joined[name]) for name in scores
                 if joined[name][0].ndim >= 2 and joined[name][0].shape[-1] >= 2}
    if agreement:
        report["top1_agreement"] = agreement
    if labels is not None:
        report["accuracy"] = {**classification(*joined[outputs[0]], labels), "output": outputs[0]}
    return report


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
    return {"max_abs": worst, "max_rel": relative_to(worst, float(np.abs(e).max(initial=0.0))),
            "mean_abs": float(diff.mean()) if diff.size else 0.0, "cosine": cosine}


def relative_to(error: float, scale: float) -> float:
    """error / scale, 0 for no error, inf for an error on an all-zero output."""
    return 0.0 if error == 0 else error / scale if scale > 0 else float("inf")


SCORE_NAMES = re.compile(r"logit|score|prob", re.IGNORECASE)


def class_scores(part: Mapping[str, Any], io: Mapping[str, Any]) -> list[str]:
    """The outputs that are scores over classes: the part's `scores`, else those named so."""
    declared = part.get("scores")
    names = list(declared) if declared is not None else [n for n in io["outputs"] if SCORE_NAMES.search(n)]
    return [n for n in names if n in io["outputs"]]


def top1_agreement(expected: np.ndarray, actual: np.ndarray) -> float:
    """How often artifact and eager pick the same class (argmax of the last dim, every position)."""
    return float((expected.argmax(-1) == actual.argmax(-1)).mean())


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


def check(report: dict[str, Any], tol) -> tuple[bool, str]:
    """Every configured tolerance, on every output; the first one missed is the reason."""
    for name, m in report["outputs"].items():
        if "shape_mismatch" in m:
            return False, f"output '{name}' has shape {m['shape_mismatch'][1]}, eager gives {m['shape_mismatch'][0]}"
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
    for name, value in agreement.items():
        if tol.min_top1_agreement is not None and value < tol.min_top1_agreement:
            return False, f"output '{name}' top-1 agreement with eager {value:.2%} < {tol.min_top1_agreement:.0%}"
    return True, ""
