"""`make scale`: how time, memory and disk grow with the model, measured in one run.

    python -m pipelines.scale [--family mlp|generator] [--sizes 1M,10M,100M] [--with-1b] [--root DIR]

For each size of a family: the cold sweep of its cells (empty cache), the same sweep warm, one
warm single run, each stage's peak resident memory (the worst cell, from the manifests) against
the budget of 3x the fp32 weights + 0.5 GB, and the artifact and cache bytes; then the ratios
between sizes. Families:

- mlp (models/scale.py, LayerNorm/Linear/GELU residual blocks over 1x64xwidth tokens): the six
  cells of `recipe=matrix`. `--with-1b` adds the 1B model through FP32 ONNX, INT8 ONNX and FP32
  .pte (the full 1B matrix is `python run.py -m recipe=matrix model=scale model.arch.width=2048 ...`).
- generator (models/generator.py at any width and depth, seeded weights, KV cache of 32
  positions): FP32 and INT4 x ONNX/.pte, each verified by greedy generation.

Writes scale.json.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

from .bench import timed
from .cache import human_bytes
from .memory import FIXED_MB, PER_WEIGHT_BYTE
from .report import table

GOALS = {"warm sweep at 100M (s)": 3.0, "warm single run, worst size (s)": 1.0}
BIG_CELLS = {"onnx": ["precision=fp32,int8", "format=onnx"], "pte": ["precision=fp32", "format=pte"]}
# a 100M model on emulated CPUs would be hours: memory and time of the stages themselves
NATIVE = ["calibration=synthetic", "verify.emulate=false"]


@dataclass(frozen=True)
class Family:
    """Models of one architecture at several sizes, and the sweep that measures them."""
    sizes: dict[str, dict[str, int]]  # size name -> the architecture's size arguments
    checkpoint: Callable[[dict[str, int]], Path]  # written once, outside the timings
    model: Callable[[dict[str, int], Path], list[str]]  # the run's model overrides
    sweep: list[str]  # the cells of the cold and warm sweeps


def _mlp_checkpoint(arch: dict[str, int]) -> Path:
    from models.scale import make_checkpoint

    path = Path("checkpoints/scale_{width}x{hidden}x{blocks}.pt".format(**arch))
    if not path.exists():
        make_checkpoint(path, **arch)
    return path


def _generator_checkpoint(arch: dict[str, int]) -> Path:
    from models.generator import make_random_checkpoint

    path = Path("checkpoints/generator_random_{width}x{layers}.pt".format(**arch))
    if not path.exists():
        make_random_checkpoint(path, **arch)
    return path


FAMILIES = {
    "mlp": Family(
        sizes={"1M": dict(width=128, hidden=512, blocks=8), "10M": dict(width=256, hidden=1024, blocks=20),
               "100M": dict(width=512, hidden=2048, blocks=48), "1B": dict(width=2048, hidden=8192, blocks=30)},
        checkpoint=_mlp_checkpoint,
        model=lambda arch, _: ["model=scale", *NATIVE, *(f"model.arch.{k}={v}" for k, v in arch.items())],
        sweep=["recipe=matrix"]),
    "generator": Family(  # 12 x width^2 parameters a layer
        sizes={"1M": dict(width=128, layers=5), "10M": dict(width=256, layers=13),
               "100M": dict(width=768, layers=14)},
        checkpoint=_generator_checkpoint,
        # untrained: near-tied logits, so token agreement is not the test of these weights (the
        # trained zoo generator's is); its logits are still judged by the precision's bounds
        model=lambda _, path: ["model=generator", *NATIVE, f"model.checkpoint={path}",
                               "precision.tolerance.min_top1_agreement=0"],
        sweep=["recipe=matrix", "precision=fp32,int4"]),
}


def disk_bytes(root: Path) -> int:
    """Bytes under root, a hard-linked file counted once."""
    seen: dict[int, int] = {}
    for folder, _, names in os.walk(root):
        for name in names:
            st = os.lstat(os.path.join(folder, name))
            seen[st.st_ino] = st.st_blocks * 512
    return sum(seen.values())


def stage_peaks(runs: Path) -> dict[str, float]:
    """Each stage's worst peak resident MB over the cells whose manifests are under runs (a
    stage's peak is measured when it computes; a hit records the lookup's)."""
    peaks: dict[str, float] = {}
    for path in runs.glob("**/manifest.json"):
        for part in json.loads(path.read_text())["parts"].values():
            for record in part["stages"]:
                if record["cache"] == "miss" and record.get("peak_mb") is not None:
                    peaks[record["stage"]] = max(peaks.get(record["stage"], 0.0), record["peak_mb"])
    return peaks


def artifacts(runs: Path) -> dict[str, int]:
    """Artifact bytes (with external data) per cell, from the sweep's matrix.json files."""
    found = {}
    for path in runs.glob("**/matrix.json"):
        for row in json.loads(path.read_text()):
            found[f"{row['precision']} {row['format']}"] = row["file_bytes"]
    return found


def measure(family: Family, size: str, root: Path) -> dict:
    checkpoint = family.checkpoint(family.sizes[size])
    weights = checkpoint.stat().st_size
    budget = PER_WEIGHT_BYTE * weights / 2**20 + FIXED_MB
    here, cache = root / size, root / size / "cache"
    model = family.model(family.sizes[size], checkpoint)
    result: dict = {"size": size, "weights_bytes": weights, "budget_mb": round(budget)}
    if size == "1B":  # the three cells the 1B model must go through, one after another
        result["cold_sweep_s"] = sum(timed(["-m", *cells, "target=server", *model, f"cache.dir={cache}",
                                            f"hydra.sweep.dir={here}/cold/{fmt}"], here / f"cold-{fmt}.log")
                                     for fmt, cells in BIG_CELLS.items())
    else:
        sweep = ["-m", *family.sweep, *model, f"cache.dir={cache}"]
        result["cold_sweep_s"] = timed([*sweep, f"hydra.sweep.dir={here}/cold"], here / "cold.log")
        result["warm_sweep_s"] = timed([*sweep, f"hydra.sweep.dir={here}/warm"], here / "warm.log")
    print(f"  {size}: cold {result['cold_sweep_s']:.1f} s", end="", flush=True)
    target = "target=server" if size == "1B" else "target=any"  # wasm32 cannot hold 4 GB of weights
    result["warm_single_s"] = timed(["precision=fp32", "format=onnx", target, *model, f"cache.dir={cache}",
                                     f"hydra.run.dir={here}/single"], here / "single.log")
    print(f", warm single {result['warm_single_s']:.2f} s"
          + (f", warm sweep {result['warm_sweep_s']:.1f} s" if "warm_sweep_s" in result else ""))
    result["peak_mb"] = stage_peaks(here / "cold")
    result["artifact_bytes"] = artifacts(here / "cold")
    result["cache_bytes"] = disk_bytes(cache)
    return result


def report(results: list[dict]) -> list[str]:
    """The size table, the per-stage peaks against each size's budget, and the ratios."""
    lines = ["", table([[r["size"], human_bytes(r["weights_bytes"]), f"{r['cold_sweep_s']:.1f}",
                         f"{r['warm_sweep_s']:.1f}" if "warm_sweep_s" in r else "-", f"{r['warm_single_s']:.2f}",
                         human_bytes(r["cache_bytes"]), f"{max(r['peak_mb'].values()) / 1024:.2f}",
                         f"{r['budget_mb'] / 1024:.2f}"] for r in results],
                       ["size", "weights", "cold sweep s", "warm sweep s", "warm single s", "cache",
                        "peak GB", "budget GB"])]
    stages = sorted({s for r in results for s in r["peak_mb"]}, key=lambda s: min(
        list(r["peak_mb"]).index(s) for r in results if s in r["peak_mb"]))
    rows = [[stage] + [_peak(r, stage) for r in results] for stage in stages]
    lines += ["", "peak resident MB per stage (worst cell; * over 3x weights + 0.5 GB)",
              table(rows, ["stage"] + [r["size"] for r in results])]
    cells = sorted({c for r in results for c in r["artifact_bytes"]})
    lines += ["", table([[c] + [human_bytes(r["artifact_bytes"].get(c)) for r in results] for c in cells],
                        ["artifact"] + [r["size"] for r in results])]
    ratios = [[f"{b['size']} / {a['size']}", f"{b['weights_bytes'] / a['weights_bytes']:.1f}",
               f"{b['cold_sweep_s'] / a['cold_sweep_s']:.2f}",
               f"{max(b['peak_mb'].values()) / max(a['peak_mb'].values()):.2f}",
               f"{b['cache_bytes'] / a['cache_bytes']:.2f}"]
              for a, b in zip(results, results[1:]) if "warm_sweep_s" in b]
    if ratios:
        lines += ["", table(ratios, ["sizes", "weights", "cold sweep", "peak RSS", "cache"])]
    return lines


def _peak(result: dict, stage: str) -> str:
    peak = result["peak_mb"].get(stage)
    return "-" if peak is None else f"{peak:.0f}" + ("*" if peak > result["budget_mb"] else "")


def goals(results: list[dict]) -> list[list[str]]:
    figures = {"warm single run, worst size (s)": max(r["warm_single_s"] for r in results)}
    at_100m = [r for r in results if r["size"] == "100M"]
    if at_100m:
        figures["warm sweep at 100M (s)"] = at_100m[0]["warm_sweep_s"]
    over = [f"{r['size']} {s}" for r in results for s, p in r["peak_mb"].items() if p > r["budget_mb"]]
    rows = [[name, f"{value:.2f}", f"<= {GOALS[name]:.1f}", "met" if value <= GOALS[name] else "MISSED"]
            for name, value in figures.items()]
    rows.append(["stages over the memory budget", str(len(over)), "0", "met" if not over else ", ".join(over)])
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m pipelines.scale", description=__doc__.split("\n")[0])
    parser.add_argument("--family", default="mlp", choices=list(FAMILIES), help="the architecture (default mlp)")
    parser.add_argument("--sizes", default="1M,10M,100M", help="of the family's sizes (1M, 10M, 100M; mlp: 1B)")
    parser.add_argument("--with-1b", action="store_true", help="add the 1B mlp (tens of minutes, ~13 GB)")
    parser.add_argument("--root", type=Path, help="where runs and caches go (default outputs/scale/<time>)")
    args = parser.parse_args(argv)
    sizes = [s for s in args.sizes.split(",") if s] + (["1B"] if args.with_1b else [])
    family = FAMILIES[args.family]
    unknown = [s for s in sizes if s not in family.sizes]
    if unknown:
        parser.error(f"unknown size {unknown[0]!r} for --family {args.family}: choose from {', '.join(family.sizes)}")
    root = args.root or Path("outputs/scale") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    root.mkdir(parents=True, exist_ok=True)
    print(f"scale: {root}  {args.family} at {', '.join(sizes)}")
    results = []
    for size in sizes:
        (root / size).mkdir(exist_ok=True)
        results.append(measure(family, size, root))
        (root / "scale.json").write_text(json.dumps(results, indent=1))  # what was measured so far
    print("\n".join(report(results)))
    print("\n" + table(goals(results), ["figure", "measured", "goal", ""]))
    print(f"\n-> {root / 'scale.json'}")
    return {"results": results}


if __name__ == "__main__":
    main()
