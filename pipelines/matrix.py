"""The multirun report: one row per cell (part x precision x format) of a sweep.

A Hydra callback: when a sweep ends it reads every job's report.json and writes matrix.md,
matrix.csv, matrix.json and matrix.png into the sweep directory, and prints the table.
"""
from __future__ import annotations

import csv
import json
import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from . import logs
from .report import human_bytes, table

COLUMNS = ["cell", "status", "size", "vs fp32", "zlib", "max abs", "cosine", "accuracy",
           "seconds"]


class MatrixReport(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = collect(sweep_dir)
        if not rows:
            return
        write(rows, sweep_dir)
        logs.console().write(f"\n{render(rows)}\n\nmatrix: {sweep_dir}/matrix.md\n")
        if any(row["status"] == "fail" for row in rows):
            sys.exit(1)


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """One flat row per part of every job in the sweep, with size relative to its fp32 cell."""
    rows = []
    for path in sorted(sweep_dir.glob("*/report.json")):
        job = json.loads(path.read_text())
        for part in job["parts"] or [{"part": "-", "status": "fail", "error": job.get("error")}]:
            verify, size = part.get("verify") or {}, part.get("size") or {}
            outputs = list((verify.get("outputs") or {}).values())
            acc = verify.get("accuracy") or {}
            rows.append({
                "model": job["model"], "part": part["part"], "precision": job["precision"],
                "format": job["format"], "status": part["status"],
                "error": part.get("error") or part.get("repair"),
                "warnings": part.get("warnings", []), "float_layers": part.get("float_layers", []),
                "file_bytes": size.get("file_bytes"), "compressed_bytes": size.get("compressed_bytes"),
                "max_abs": max((o["max_abs"] for o in outputs), default=None),
                "cosine": min((o["cosine"] for o in outputs), default=None),
                "accuracy_eager": acc.get("eager"), "accuracy": acc.get("artifact"),
                "top1_agreement": min([*(verify.get("top1_agreement") or {}).values(),
                                       *([acc["top1_agreement"]] if acc else [])], default=None),
                "seconds": part.get("seconds"),
                "artifact": part.get("artifact"), "job_dir": str(path.parent),
            })
    fp32 = {(r["model"], r["part"], r["format"]): r["file_bytes"] for r in rows
            if r["precision"] == "fp32" and r["status"] == "pass"}
    for row in rows:
        base = fp32.get((row["model"], row["part"], row["format"]))
        row["size_ratio_to_fp32"] = round(row["file_bytes"] / base, 4) if base and row["file_bytes"] else None
    order = {"fp32": 0, "fp16": 1, "int8": 2, "int8_dynamic": 3}
    parts: dict[tuple[str, str], int] = {}  # a model's parts in their config order (encoder first)
    for row in rows:
        parts.setdefault((row["model"], row["part"]), len(parts))
    return sorted(rows, key=lambda r: (r["model"], parts[r["model"], r["part"]], r["format"],
                                       order.get(r["precision"], 9)))


def cells(rows: list[dict[str, Any]]) -> list[list[str]]:
    def number(value, spec):
        return "-" if value is None else format(value, spec)

    return [[f"{r['model']}/{r['part']} {r['precision']} {r['format']}", r["status"].upper(),
             human_bytes(r["file_bytes"]), number(r["size_ratio_to_fp32"], ".2f"),
             human_bytes(r["compressed_bytes"]), number(r["max_abs"], ".2e"), number(r["cosine"], ".5f"),
             "-" if r["accuracy"] is None else f"{r['accuracy']:.2%}", number(r["seconds"], ".1f")]
            for r in rows]


def notes(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(cell, text) for every failure, fallback reason and warning."""
    return [(f"{r['model']}/{r['part']} {r['precision']} {r['format']}", text)
            for r in rows for text in ([r["error"]] if r["error"] else [])
            + [f"warning: {w}" for w in r["warnings"]]]


def render(rows: list[dict[str, Any]]) -> str:
    return "\n".join([table(cells(rows), COLUMNS), *(f"  {cell}: {text}" for cell, text in notes(rows))])


def write(rows: list[dict[str, Any]], sweep_dir: Path) -> None:
    (sweep_dir / "matrix.json").write_text(json.dumps(rows, indent=1))
    with open(sweep_dir / "matrix.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(c) + " |" for c in cells(rows)]
    md += [""] + [f"- **{cell}**: {text}" for cell, text in notes(rows)]
    (sweep_dir / "matrix.md").write_text("\n".join(md) + "\n")
    plot(rows, sweep_dir / "matrix.png")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Size against worst verification error, one labelled point per cell."""
    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # its font-cache notice is not the run
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in rows if r["file_bytes"] and r["max_abs"] is not None]
    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    colours = {"pass": "tab:green", "mixed": "tab:olive", "fallback": "tab:orange", "fail": "tab:red"}
    for r in points:
        axes.scatter(r["file_bytes"] / 1024, max(r["max_abs"], 1e-9), color=colours[r["status"]])
        axes.annotate(f"{r['part']} {r['precision']} {r['format']}",
                      (r["file_bytes"] / 1024, max(r["max_abs"], 1e-9)),
                      textcoords="offset points", xytext=(5, 4), fontsize=8)
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("artifact size (KiB)")
    axes.set_ylabel("worst max abs error vs eager PyTorch")
    axes.set_title("size vs fidelity (green pass, olive mixed, orange fallback, red fail)")
    axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
