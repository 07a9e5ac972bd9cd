"""The multirun report: one row per cell (part x precision x format) of a sweep.

A Hydra callback: when a sweep ends it reads every job's report.json and writes matrix.html (the
table, plots and each cell's diagnosis, pipelines/html_report.py), matrix.md, matrix.csv,
matrix.json, matrix_size.png and matrix_latency.png into the sweep directory, and prints the table.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from . import logs
from .html_report import cached_plots, write_html
from .cache import human_bytes
from .report import device_cell, latency_cells, table, target_cell

COLUMNS = ["cell", "status", "size", "vs fp32", "zlib", "max abs", "cosine", "accuracy",
           "p50 ms", "vs eager", "devices", "seconds"]


class MatrixReport(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        cache = config.cache.dir if config.cache.enabled else None
        if not report(Path(config.hydra.sweep.dir), cache):
            sys.exit(1)


def report(sweep_dir: Path, cache_dir: str | None = None) -> bool:
    """Write and print the sweep's matrix; whether every cell passed (or was repaired). Also
    `python -m pipelines.matrix <sweep dir>` after a sweep a native crash ended: cells with no
    report are listed as such. Its plots are cached in cache_dir when one is given."""
    rows = collect(sweep_dir)
    if not rows:
        return True
    write(rows, sweep_dir, cache_dir)
    logs.console().write(f"\n{render(rows)}\n\nmatrix: {sweep_dir}/matrix.html (and .md, .csv, .json)\n")
    return not any(row["status"] == "fail" for row in rows)


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
                **_latency_columns(part.get("latency")), **_target_columns(part.get("target")),
                "diagnosis": _diagnosis_line(verify), "generation": _generation_line(verify.get("generation")),
                "artifact": part.get("artifact"), "job_dir": str(path.parent),
            })
    rows += _missing(sweep_dir, {(r["model"], r["precision"], r["format"]) for r in rows})
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


SWEPT = ("model", "precision", "format")  # the keys a cell is named by (its job's subdir)


def _missing(sweep_dir: Path, found: set[tuple[str, str, str]]) -> list[dict[str, Any]]:
    """A row for every cell the sweep asked for (multirun.yaml) that left no report.json."""
    import itertools

    import yaml

    try:
        config = yaml.safe_load((sweep_dir / "multirun.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return []
    values = {key: [config[key]["name"]] if isinstance(config.get(key), dict) else [] for key in SWEPT}
    asked = {**(config["hydra"]["sweeper"].get("params") or {}),
             **dict(o.split("=", 1) for o in config["hydra"]["overrides"]["task"] if "=" in o)}
    for key in SWEPT:
        if key in asked:
            values[key] = [v.strip() for v in str(asked[key]).split(",")]
    rows = []
    for model, precision, fmt in itertools.product(*(values[key] for key in SWEPT)):
        if (model, precision, fmt) not in found:
            rows.append({"model": model, "part": "-", "precision": precision, "format": fmt,
                         "status": "fail", "warnings": [], "float_layers": [],
                         "error": "no report: the job died or never ran (a native crash can end a "
                                  f"sweep); see {sweep_dir}/{model}_{precision}_{fmt}/run.log",
                         **{k: None for k in ("file_bytes", "compressed_bytes", "max_abs", "cosine",
                                              "accuracy_eager", "accuracy", "top1_agreement", "seconds",
                                              "artifact", "diagnosis")}, "job_dir": None,
                         **_latency_columns(None), **_target_columns(None)})
    return rows


def _latency_columns(latency: dict[str, Any] | None) -> dict[str, Any]:
    latency = latency or {}
    return {"runtime": latency.get("runtime"), "threads": latency.get("threads"),
            "latency_p50_ms": latency.get("p50_ms"), "latency_p90_ms": latency.get("p90_ms"),
            "eager_p50_ms": latency.get("eager_p50_ms"), "speedup": latency.get("speedup"),
            "profile": latency.get("profile")}


def _target_columns(target: dict[str, Any] | None) -> dict[str, Any]:
    target = target or {}
    return {"target_status": target.get("status"), "target_reason": target.get("reason"),
            "devices": target.get("devices") or {}}


def device_names(rows: list[dict[str, Any]]) -> list[str]:
    """Every device any cell was checked on, in the order the targets list them."""
    return list(dict.fromkeys(name for r in rows for name in r["devices"]))


def _diagnosis_line(verify: dict[str, Any]) -> str | None:
    """The diagnosis in one line, for a cell that has one (stages/support/diagnose.py's describe)."""
    diagnosis = verify.get("diagnosis")
    if not diagnosis:
        return None
    suspects = diagnosis.get("suspects") or []
    return (f"{suspects[0]['module']} ({suspects[0]['type']}): {suspects[0]['why']}" if suspects
            else diagnosis.get("note") or "no layer stands out: the error builds up across the model")


def _generation_line(generated: dict[str, Any] | None) -> str | None:
    """A decoder's greedy generation against eager's, its speed as verification timed it and the
    state it carries."""
    if not generated:
        return None
    rate = lambda key: "-" if generated.get(key) is None else f"{generated[key]:.0f}"  # noqa: E731
    parted = generated.get("first_divergence")
    return (f"generation: {generated['token_match']:.1%} of {generated['prompts']}x{generated['steps']} greedy tokens "
            f"match eager's" + (f", first divergence at step {parted}" if parted is not None else "")
            + f"; prefill {rate('prefill_tokens_per_s')} tok/s, decode {rate('decode_tokens_per_s')} tok/s; "
            f"state carried {human_bytes(generated.get('state_bytes'))}")


def cells(rows: list[dict[str, Any]]) -> list[list[str]]:
    def number(value, spec):
        return "-" if value is None else format(value, spec)

    devices = device_names(rows)
    return [[f"{r['model']}/{r['part']} {r['precision']} {r['format']}", r["status"].upper(),
             human_bytes(r["file_bytes"]), number(r["size_ratio_to_fp32"], ".2f"),
             human_bytes(r["compressed_bytes"]), number(r["max_abs"], ".2e"), number(r["cosine"], ".5f"),
             "-" if r["accuracy"] is None else f"{r['accuracy']:.2%}",
             *latency_cells({"p50_ms": r["latency_p50_ms"], "speedup": r["speedup"]}
                            if r["latency_p50_ms"] is not None else None),
             target_cell({"status": r["target_status"], "devices": r["devices"]} if r["target_status"] else None),
             number(r["seconds"], ".1f"), *(device_cell(r["devices"].get(name)) for name in devices)]
            for r in rows]


def columns(rows: list[dict[str, Any]]) -> list[str]:
    return [*COLUMNS, *device_names(rows)]


def notes(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(cell, text) for every failure, repair, warning and target check that did not pass."""
    return [(f"{r['model']}/{r['part']} {r['precision']} {r['format']}", text)
            for r in rows for text in ([r["error"]] if r["error"] else [])
            + ([r["generation"]] if r.get("generation") else [])
            + [f"warning: {w}" for w in r["warnings"]]
            + ([f"time: {r['profile']['why']}"] if r.get("profile") else [])
            + ([f"target {r['target_status'].upper()}: {r['target_reason']}"]
               if r["target_status"] in ("fail", "skipped", "partial") else [])]


def render(rows: list[dict[str, Any]]) -> str:
    return "\n".join([table(cells(rows), columns(rows)), *(f"  {cell}: {text}" for cell, text in notes(rows))])


def write(rows: list[dict[str, Any]], sweep_dir: Path, cache_dir: str | None = None) -> None:
    (sweep_dir / "matrix.json").write_text(json.dumps(rows, indent=1))
    devices = device_names(rows)
    flat = [{**{k: v for k, v in r.items() if k != "devices"}, "profile": (r.get("profile") or {}).get("why"),
             **{f"device:{name}": device_cell(r["devices"].get(name)) for name in devices}} for r in rows]
    with open(sweep_dir / "matrix.csv", "w", newline="") as handle:
        # every row's columns: a cell with no report has fewer than one that ran
        writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(k for row in flat for k in row)))
        writer.writeheader()
        writer.writerows(flat)
    head = columns(rows)
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(c) + " |" for c in cells(rows)]
    md += [""] + [f"- **{cell}**: {text}" for cell, text in notes(rows)]
    (sweep_dir / "matrix.md").write_text("\n".join(md) + "\n")
    write_html(rows, sweep_dir, cached_plots(rows, sweep_dir, cache_dir))


if __name__ == "__main__":
    sys.exit(0 if report(Path(sys.argv[1])) else 1)
