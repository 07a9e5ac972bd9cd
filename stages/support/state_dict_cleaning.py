"""Map a checkpoint's state dict onto the keys, shapes and dtypes of the target architecture."""
from __future__ import annotations

import difflib
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from itertools import permutations

import torch

from pipelines.errors import PipelineError

Expected = dict[str, tuple[tuple[int, ...], torch.dtype]]
SHOWN = 10
REPORT_HINT = "see key_report.json"
WIDE_SEARCHES, POOL_LIMIT, COMPARISONS = 50, 300, 100_000  # bound the cost of closest-key suggestions
# Wrappers added around a model by training code: (rule name, key -> key).
AUTO_RULES: dict[str, Callable[[str], str]] = {
    "strip '_orig_mod.' (torch.compile)": lambda key: key.replace("_orig_mod.", ""),
    "strip leading 'module.' (DDP/DataParallel)": lambda key: key.removeprefix("module."),
    "strip leading 'model.' (Lightning)": lambda key: key.removeprefix("model."),
}


class KeysDoNotFit(PipelineError):
    """The weights do not fit the model; `report` is the full key report, for key_report.json."""

    def __init__(self, message: str, *, fix: str, report: dict):
        super().__init__(message, fix=fix)
        self.report = report


@dataclass
class CleanOptions:
    """How to turn checkpoint keys into model keys (the `model.clean.*` settings)."""

    strip_prefixes: list[str] | None = None
    select: str | None = None
    rename: dict[str, str] = field(default_factory=dict)
    drop: list[str] = field(default_factory=list)
    prefer_ema: bool = False
    strict: bool = True


def clean_state_dict(
    state_dict: dict[str, torch.Tensor],
    expected: Expected,
    options: CleanOptions,
    ema_state_dict: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Return the weights the model expects (cast to its dtypes) and a JSON-serializable key report.

    Raises PipelineError on shape mismatches, and on missing keys when `options.strict`.
    """
    applied: list[dict] = []
    weights = _pick_source(state_dict, ema_state_dict, options.prefer_ema, applied)
    if options.select:
        weights = _select(weights, options.select, applied)
    weights = _drop(weights, options.drop, applied)
    weights = _rename(weights, options.rename, applied)
    if options.strip_prefixes is None:
        weights = _auto_strip(weights, expected, applied)
    else:
        weights = _strip_given(weights, options.strip_prefixes, applied)
    cleaned, report = _compare(weights, expected)
    report = {"applied": applied, **report, "strict": options.strict}
    _check(report, options.strict, len(expected))
    return cleaned, report


def fit(weights: dict[str, torch.Tensor], expected: Expected) -> int:
    """How many of the expected keys `weights` provides with their shapes, wrapper prefixes stripped."""
    stripped = _auto_strip(dict(weights), expected, [])
    return sum(key in expected and tuple(t.shape) == tuple(expected[key][0]) for key, t in stripped.items())


# ---------------------------------------------------------------- user-directed steps


def _pick_source(weights: dict, ema: dict | None, prefer_ema: bool, applied: list[dict]) -> dict:
    if not prefer_ema:
        return dict(weights)
    if not ema:
        inline = sorted(p for p in _top_prefixes(weights) if "ema" in p.lower())
        fix = (
            f"the weights contain EMA-looking prefixes: use model.clean.select={inline[0]}. with prefer_ema=false"
            if inline
            else "set model.clean.prefer_ema=false"
        )
        raise PipelineError(
            "model.clean.prefer_ema=true but the checkpoint has no EMA weights "
            f"(its weights have top-level prefixes: {_prefix_summary(weights)})",
            fix=fix,
        )
    applied.append({"rule": "use EMA weights (prefer_ema)", "count": len(ema)})
    return dict(ema)


def _select(weights: dict, prefix: str, applied: list[dict]) -> dict:
    prefix = prefix if prefix.endswith(".") else f"{prefix}."
    selected = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    if not selected:
        deeper = Counter(k[: k.find(f".{prefix}") + len(prefix) + 1] for k in weights if f".{prefix}" in k)
        fix = (
            f"use model.clean.select={deeper.most_common(1)[0][0]}"
            if deeper
            else f"pick one of the top-level prefixes: {_prefix_summary(weights)}"
        )
        raise PipelineError(f"model.clean.select={prefix}: no checkpoint key starts with '{prefix}'", fix=fix)
    applied.append({"rule": f"select '{prefix}'", "count": len(selected)})
    return selected


def _drop(weights: dict, patterns: list[str], applied: list[dict]) -> dict:
    for pattern in patterns:
        regex = _compile(pattern, "model.clean.drop")
        kept = {k: v for k, v in weights.items() if not regex.search(k)}
        applied.append({"rule": f"drop /{pattern}/", "count": len(weights) - len(kept)})
        weights = kept
    return weights


def _rename(weights: dict, rules: dict[str, str], applied: list[dict]) -> dict:
    for pattern, replacement in rules.items():
        regex = _compile(pattern, "model.clean.rename")
        try:
            renamed = {k: regex.sub(replacement, k) for k in weights}
        except (re.error, TypeError) as exc:
            raise PipelineError(
                f"model.clean.rename: bad replacement {replacement!r} for /{pattern}/ ({exc})",
                fix="use \\1 or \\g<name> only for groups the pattern defines",
            ) from exc
        collisions = [new for new, n in Counter(renamed.values()).items() if n > 1]
        if collisions:
            raise PipelineError(
                f"model.clean.rename /{pattern}/ -> {replacement!r} maps several keys to the same name: "
                f"{_capped(collisions, 5)}",
                fix="make the pattern more specific, or drop the duplicates first with model.clean.drop",
            )
        count = sum(key != new for key, new in renamed.items())
        applied.append({"rule": f"rename /{pattern}/ -> {replacement!r}", "count": count})
        weights = {renamed[k]: v for k, v in weights.items()}
    return weights


def _strip_given(weights: dict, prefixes: list[str], applied: list[dict]) -> dict:
    for prefix in prefixes:
        weights, count = _apply(weights, lambda key, p=prefix: key.removeprefix(p), set())
        applied.append({"rule": f"strip leading '{prefix}'", "count": count})
    return weights


def _compile(pattern: str, setting: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except (re.error, TypeError) as exc:
        raise PipelineError(f"{setting}: invalid regular expression {pattern!r} ({exc})", fix="fix the regex") from exc


# ---------------------------------------------------------------- automatic wrapper stripping


def _auto_strip(weights: dict, expected: Expected, applied: list[dict]) -> dict:
    """Apply the combination of wrapper rules that matches the most expected keys, if it helps at all."""
    best, best_score = None, _score(weights, expected)
    if best_score == len(expected):
        return weights
    for names in _rule_sequences():
        candidate, counts = weights, []
        for name in names:
            candidate, count = _apply(candidate, AUTO_RULES[name], expected.keys())
            counts.append(count)
        score = _score(candidate, expected)
        if score > best_score and all(counts):
            best, best_score = (candidate, names, counts), score
    if best is None:
        return weights
    candidate, names, counts = best
    applied.extend({"rule": name, "count": count} for name, count in zip(names, counts))
    return candidate


def _rule_sequences() -> list[tuple[str, ...]]:
    """Every ordered combination of the wrapper rules, shortest first."""
    names = list(AUTO_RULES)
    return [seq for size in range(1, len(names) + 1) for seq in permutations(names, size)]


def _apply(weights: dict, rule: Callable[[str], str], keep: Collection[str]) -> tuple[dict, int]:
    """Rewrite keys not in `keep` with `rule`, unless the new key is already taken; count rewrites."""
    taken = set(weights)
    result, count = {}, 0
    for key, value in weights.items():
        new = key if key in keep else rule(key)
        if new != key and new not in taken:
            result[new], count = value, count + 1
            taken.add(new)
        else:
            result[key] = value
    return result, count


def _score(weights: dict, expected: Expected) -> int:
    return sum(key in expected for key in weights)


# ---------------------------------------------------------------- comparison and failure


def _compare(weights: dict, expected: Expected) -> tuple[dict, dict]:
    cleaned, shape_mismatch, dtype_cast, dtype_mismatch = {}, [], [], []
    for key, tensor in weights.items():
        if key not in expected:
            continue
        shape, dtype = expected[key]
        if tuple(tensor.shape) != tuple(shape):
            shape_mismatch.append({"key": key, "checkpoint": list(tensor.shape), "expected": list(shape)})
        elif tensor.dtype != dtype and not _castable(tensor.dtype, dtype):
            dtype_mismatch.append({"key": key, "checkpoint": str(tensor.dtype), "expected": str(dtype)})
        else:
            if tensor.dtype != dtype:
                dtype_cast.append({"key": key, "checkpoint": str(tensor.dtype), "expected": str(dtype)})
                tensor = tensor.to(dtype)
            cleaned[key] = tensor
    unexpected = [k for k in weights if k not in expected]
    missing = [k for k in expected if k not in weights]
    report = {
        "matched": sum(k in expected for k in weights),
        "missing": _closest(missing, unexpected),
        "unexpected": unexpected,
        "shape_mismatch": shape_mismatch,
        "dtype_cast": dtype_cast,
        "dtype_mismatch": dtype_mismatch,
    }
    return cleaned, report


def _castable(source: torch.dtype, target: torch.dtype) -> bool:
    """Casting keeps the values' meaning: float->float, int/bool->int/bool, int->float, real->complex."""
    if target.is_complex:
        return True
    if target.is_floating_point:
        return not source.is_complex
    return not (source.is_floating_point or source.is_complex)


def _closest(missing: list[str], candidates: list[str]) -> list[dict]:
    """Each missing key with the most similar unexpected checkpoint key.

    Candidates with the same layer numbers are compared first; a wider search is done only for the
    first few keys, so that huge mismatches stay fast.
    """
    by_numbers: dict[tuple[str, ...], list[str]] = defaultdict(list)
    by_leaf: dict[str, list[str]] = defaultdict(list)
    for key in candidates:
        by_numbers[_numbers(key)].append(key)
        by_leaf[key.rsplit(".", 1)[-1]].append(key)
    limit = min(POOL_LIMIT, max(10, COMPARISONS // max(len(missing), 1)))
    result = []
    for index, key in enumerate(missing):
        pool = by_numbers.get(_numbers(key))
        if not pool and index < WIDE_SEARCHES:
            pool = by_leaf.get(key.rsplit(".", 1)[-1]) or candidates
        match = difflib.get_close_matches(key, (pool or [])[:limit], n=1, cutoff=0.5)
        result.append({"key": key, "closest": match[0] if match else None})
    return result


def _numbers(key: str) -> tuple[str, ...]:
    return tuple(re.findall(r"\d+", key))


def _check(report: dict, strict: bool, expected_count: int) -> None:
    missing = [m for m in report["missing"] if not m["key"].endswith("num_batches_tracked")] if strict else []
    broken = report["shape_mismatch"] + report["dtype_mismatch"]
    if not missing and not broken:
        return
    lines = [
        f"checkpoint weights do not fit the model: {report['matched']}/{expected_count} expected keys found, "
        f"{len(report['missing'])} missing, {len(report['unexpected'])} unexpected, "
        f"{len(broken)} with the wrong shape/dtype"
    ]
    lines += [f"  missing {m['key']} (closest: {m['closest'] or 'none'})" for m in missing[:SHOWN]]
    lines += _more(missing)
    lines += [
        f"  {b['key']}: checkpoint {_fmt(b['checkpoint'])} vs model {_fmt(b['expected'])}" for b in broken[:SHOWN]
    ]
    lines += _more(broken)
    raise KeysDoNotFit("\n".join(lines), fix=_suggest_fix(report, missing, broken, expected_count), report=report)


def _suggest_fix(report: dict, missing: list[dict], broken: list[dict], expected_count: int) -> str:
    missing_keys = [m["key"] for m in missing]
    unexpected = report["unexpected"]
    extra = _common_prefix_fix(unexpected, missing_keys)
    lacking = _common_prefix_fix(missing_keys, unexpected)
    hints = []
    if extra and report["matched"] == 0:
        hints.append(f"the weights sit under '{extra}': use model.clean.select={extra}")
    elif extra:
        hints.append(f"the weights sit under '{extra}': use model.clean.rename={{'^{re.escape(extra)}': ''}}")
    if lacking:
        hints.append(f"the checkpoint lacks the '{lacking}' prefix: use model.clean.rename={{'^': '{lacking}'}}")
    if missing and not (extra or lacking):
        if report["matched"] < expected_count // 2:
            hints.append("this checkpoint belongs to another model: check model= and model.checkpoint=")
        else:
            hints.append("map renamed keys with model.clean.rename, or load anyway with model.clean.strict=false")
    if broken:
        hints.append(
            "the model's hyper-parameters differ from the checkpoint's: set them to match, or drop those keys "
            "with model.clean.drop and set model.clean.strict=false"
        )
    return "; ".join(hints)


def _common_prefix_fix(have: list[str], want: list[str]) -> str | None:
    """The dotted prefix that, stripped from `have` keys, turns the most of them into `want` keys."""
    wanted = set(want)
    counts = Counter(
        key[: i + 1] for key in have for i, char in enumerate(key) if char == "." and key[i + 1 :] in wanted
    )
    return counts.most_common(1)[0][0] if counts else None


# ---------------------------------------------------------------- formatting


def _top_prefixes(weights: dict) -> Counter:
    return Counter(k.split(".", 1)[0] for k in weights)


def _prefix_summary(weights: dict) -> str:
    return _capped([f"{p}. ({n} keys)" for p, n in _top_prefixes(weights).most_common()], 6)


def _capped(items: list[str], limit: int) -> str:
    shown = ", ".join(items[:limit])
    return f"{shown}, ... and {len(items) - limit} more" if len(items) > limit else shown


def _more(items: list) -> list[str]:
    return [f"  ... and {len(items) - SHOWN} more ({REPORT_HINT})"] if len(items) > SHOWN else []


def _fmt(value: list | str) -> str:
    return str(tuple(value)) if isinstance(value, list) else value
