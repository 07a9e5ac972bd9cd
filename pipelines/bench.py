"""`make bench`: what the cache and the sweep buy, and what each precision saves, measured in one run.

    python -m pipelines.bench [hydra overrides, e.g. model=kws_resnet]

1. the cold six-cell sweep (empty cache), 2. the same sweep again (warm cache),
3. the six cells as single runs, each with an empty cache, 4. artifact sizes per precision,
5. on the demo model, the cold INT8 ONNX cell (`python run.py precision=int8 format=onnx`, empty
cache) against the hand-written script it replaces (pipelines/hand_script.py), timed in pairs
(A B A B) and compared by medians.
Writes bench.json beside the runs in outputs/bench/<time>/ and prints the ratios with their goals.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from .report import table

CELLS = [(p, f) for p in ("fp32", "fp16", "int8") for f in ("onnx", "pte")]
GOALS = {  # figure -> the most it may be
    "warm_sweep / cold_sweep": 0.05,
    "cold_sweep / sum_of_single_runs": 0.25,
    "cold INT8 ONNX cell / hand script": 1.0,
    "int8 / fp32 size (onnx)": 0.30, "int8 / fp32 size (pte)": 0.30,
    "fp16 / fp32 size (onnx)": 0.55, "fp16 / fp32 size (pte)": 0.55,
}


HAND_PAIRS = 3
DEMO_CHECKPOINT = "checkpoints/digits_cnn.pt"


def timed(args: list[str], log: Path, module: str | None = None) -> float:
    """Seconds one `python run.py ...` (or `python -m module ...`) takes; its output goes to log.
    Fails loudly if it fails."""
    command = [sys.executable, *(["-m", module] if module else ["run.py"]), *args]
    started = time.monotonic()
    with open(log, "w") as handle:
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT).returncode
    seconds = time.monotonic() - started
    if code != 0:
        raise SystemExit(f"`{' '.join(command[1:])}` failed (exit {code}); see {log}")
    return seconds


def against_hand_script(root: Path, overrides: list[str]) -> dict[str, float]:
    """Medians of HAND_PAIRS pairs: the hand script, then the cold INT8 ONNX cell (each cell
    with an empty cache of its own), alternating so a drift of the machine hits both."""
    hand, cell = [], []
    for i in range(HAND_PAIRS):
        hand.append(timed([DEMO_CHECKPOINT, str(root / f"hand-{i}")], root / f"hand-{i}.log", "pipelines.hand_script"))
        cell.append(timed(["precision=int8", "format=onnx", *overrides, f"cache.dir={root}/hand-cell-cache-{i}",
                           f"hydra.run.dir={root}/hand-cell-{i}"], root / f"hand-cell-{i}.log"))
        print(f"  hand script {hand[-1]:5.1f} s, cold INT8 ONNX cell {cell[-1]:5.1f} s")
    return {"hand_script": statistics.median(hand), "cold_int8_onnx_cell": statistics.median(cell)}


# the pipeline's own cost: emulated devices (tens of seconds a cell) are make matrix's to check
PIPELINE_ONLY = ["verify.emulate=false"]


def main(overrides: list[str]) -> dict:
    overrides = [*PIPELINE_ONLY, *overrides]
    root = Path("outputs/bench") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    root.mkdir(parents=True)
    print(f"bench: {root}  (overrides: {' '.join(overrides) or 'none'})")
    timed(["recipe=web_dev", *overrides, f"cache.dir={root}/warmup-cache", f"hydra.run.dir={root}/warmup"],
          root / "warmup.log")  # makes a missing checkpoint outside the timed runs
    sweep = ["-m", "recipe=matrix", *overrides, f"cache.dir={root}/sweep-cache"]
    seconds = {"cold_sweep": timed([*sweep, f"hydra.sweep.dir={root}/cold"], root / "cold.log")}
    print(f"  cold sweep   {seconds['cold_sweep']:7.1f} s")
    seconds["warm_sweep"] = timed([*sweep, f"hydra.sweep.dir={root}/warm"], root / "warm.log")
    print(f"  warm sweep   {seconds['warm_sweep']:7.1f} s")
    singles = {}
    for precision, fmt in CELLS:
        name = f"{precision}_{fmt}"
        singles[name] = timed([f"precision={precision}", f"format={fmt}", "target=any", *overrides,
                               f"cache.dir={root}/single-cache-{name}", f"hydra.run.dir={root}/single-{name}"],
                              root / f"single-{name}.log")
        print(f"  single {name:<10} {singles[name]:5.1f} s (empty cache)")
    seconds["sum_of_single_runs"] = sum(singles.values())
    demo = not any(o.startswith("model=") for o in overrides)  # the hand script is the demo model's
    if demo:
        seconds.update(against_hand_script(root, overrides))

    rows = json.loads((root / "cold" / "matrix.json").read_text())
    sizes = {(r["part"], r["precision"], r["format"]): r["file_bytes"] for r in rows}
    figures = {"warm_sweep / cold_sweep": seconds["warm_sweep"] / seconds["cold_sweep"],
               "cold_sweep / sum_of_single_runs": seconds["cold_sweep"] / seconds["sum_of_single_runs"]}
    if demo:
        figures["cold INT8 ONNX cell / hand script"] = seconds["cold_int8_onnx_cell"] / seconds["hand_script"]
    for part in sorted({r["part"] for r in rows}):
        for fmt in ("onnx", "pte"):
            for precision in ("int8", "fp16"):
                low, base = sizes.get((part, precision, fmt)), sizes.get((part, "fp32", fmt))
                if low and base:
                    suffix = "" if len({r["part"] for r in rows}) == 1 else f" {part}"
                    figures[f"{precision} / fp32 size ({fmt}){suffix}"] = low / base
    result = {"seconds": seconds, "single_runs": singles, "figures": figures,
              "cells": [{k: r[k] for k in ("part", "precision", "format", "status", "file_bytes")}
                        for r in rows]}
    (root / "bench.json").write_text(json.dumps(result, indent=1))
    lines = []
    for name, value in figures.items():
        goal = GOALS.get(name.rsplit(" ", 1)[0] if name not in GOALS else name)
        verdict = "-" if goal is None else ("met" if value <= goal else "MISSED")
        lines.append([name, f"{value:.3f}", "-" if goal is None else f"<= {goal:.2f}", verdict])
    print("\n" + table(lines, ["figure", "measured", "goal", ""]))
    print(f"\ncold {seconds['cold_sweep']:.1f} s, warm {seconds['warm_sweep']:.1f} s, "
          f"six single cold runs {seconds['sum_of_single_runs']:.1f} s"
          + (f", hand script {seconds['hand_script']:.1f} s vs cold INT8 ONNX cell {seconds['cold_int8_onnx_cell']:.1f} s"
             if demo else "") + f"   ->  {root / 'bench.json'}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
