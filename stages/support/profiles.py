"""Where an artifact's time goes in its runtime: per operator (onnxruntime's profiler,
ExecuTorch's ETDump), inside a delegate or not, and what a change of input shape costs a
runtime that plans per shape. The benchmark stage asks for it when a cell is slower than eager."""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, Callable, Mapping

import numpy as np

SHOWN = 8  # operators listed by time


def summarize(events: list[dict[str, Any]], calls: int) -> dict[str, Any]:
    """Per operator and where it ran: milliseconds per call, share of the operators' time, runs per
    call; and each place's share (XNNPACK vs portable kernels, an execution provider)."""
    total_us: dict[tuple[str, str], float] = defaultdict(float)
    runs: dict[tuple[str, str], int] = defaultdict(int)
    for event in events:
        total_us[event["op"], event["where"]] += event["us"]
        runs[event["op"], event["where"]] += 1
    whole = sum(total_us.values()) or 1.0
    ranked = sorted(total_us, key=total_us.get, reverse=True)
    ops = [{"op": op, "where": where, "ms": round(total_us[op, where] / calls / 1000, 6),
            "share": round(total_us[op, where] / whole, 4), "per_call": runs[op, where] // max(calls, 1)}
           for op, where in ranked]
    places: dict[str, float] = defaultdict(float)
    for (_, where), us in total_us.items():
        places[where] += us / whole
    return {"calls": calls, "operators_ms": round(whole / calls / 1000, 6), "ops": ops[:SHOWN],
            "others": len(ops) - min(len(ops), SHOWN),
            "where": {place: round(share, 4) for place, share in sorted(places.items(), key=lambda p: -p[1])}}


def shape_change_cost(run: Callable[[dict[str, np.ndarray]], Any], feed: Mapping[str, np.ndarray],
                      batch_axes: Mapping[str, int] | None, calls: int = 10) -> dict[str, Any] | None:
    """For an artifact with a dynamic batch: milliseconds per call at one batch size, and when
    every call changes it (1, 2, 1, 2, ...): a runtime that re-plans its memory or its kernels per
    shape pays the difference on every change. None for a static artifact."""
    if not batch_axes:
        return None
    doubled = {name: np.concatenate([array, array], axis=batch_axes[name]) if name in batch_axes else array
               for name, array in feed.items()}

    def per_call(feeds: list[Mapping[str, np.ndarray]]) -> float:
        for item in feeds[:2]:
            run(item)
        started = time.perf_counter()
        for i in range(calls):
            run(feeds[i % len(feeds)])
        return (time.perf_counter() - started) * 1000 / calls

    same = (per_call([feed]) + per_call([doubled])) / 2
    changing = per_call([feed, doubled])
    return {"same_shape_ms": round(same, 4), "changing_shape_ms": round(changing, 4),
            "replans": changing > 1.5 * same and changing - same > 0.05}


def explain(profile: Mapping[str, Any], speedup: float) -> str:
    """One line: why the cell is slower than eager, from its profile."""
    top = ", ".join(f"{op['op']} ({op['where']}) {op['ms']:.3g} ms" for op in profile["ops"][:3])
    places = ", ".join(f"{share:.0%} {place}" for place, share in profile["where"].items())
    line = f"{speedup:.2f}x eager: operator time {profile['operators_ms']:.3g} ms/call ({places}); top: {top}"
    change = profile.get("shape_change")
    if change and change["replans"]:
        line += (f"; a new batch size costs {change['changing_shape_ms'] - change['same_shape_ms']:.3g} ms "
                 "(the runtime re-plans per shape)")
    return line
