"""matrix.html: one static, self-contained page per sweep (inline CSS, plots as data: URIs, no
script, no external URL): header, the cell table coloured by status, the plots, and per cell why
it is what it is (note, warnings, layer diagnosis, layers kept float, where each figure came from).

    rows = collect(sweep_dir)                      # pipelines/matrix.py
    write_html(rows, sweep_dir, plots(rows, sweep_dir))
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
from collections import Counter
from datetime import datetime
from html import escape
from pathlib import Path
from typing import Any

from .cache import human_bytes

COLOURS = {"pass": "#1a7f37", "mixed": "#9a8700", "fallback": "#d46b08", "fail": "#cf222e",
           "skipped": "#8c959f", "partial": "#8c959f"}
OTHER = "#57606a"
CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1320px;color:#1f2328;padding:0 16px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d0d7de}
h3{font-size:15px;margin:0 0 6px} .meta,.why,dt{color:#57606a} .meta b{color:#1f2328;font-weight:600}
table{border-collapse:collapse;font-size:13px;width:100%} a{color:inherit}
th,td{padding:4px 8px;border-bottom:1px solid #eaeef2;text-align:left;vertical-align:top}
th{background:#f6f8fa} th,td.c,td.n{white-space:nowrap} td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.row td:first-child{border-left:5px solid var(--c)} tr.suspect td{background:#fff1e5}
.b{display:inline-block;min-width:64px;text-align:center;padding:1px 6px;border-radius:4px;color:#fff;
   font-weight:600;font-size:12px} .chips .b{margin-right:6px}
section{border:1px solid #d0d7de;border-left:6px solid var(--c);border-radius:6px;padding:10px 14px;margin:10px 0}
dl{display:grid;grid-template-columns:120px 1fr;gap:4px 12px;margin:0} dd{margin:0} ul,ol{margin:0;padding-left:20px}
code{font-size:12.5px;background:#f6f8fa;padding:0 3px;border-radius:3px} summary{cursor:pointer;color:#0969da}
.plots{display:flex;flex-wrap:wrap;gap:16px}
.plots img{flex:1 1 560px;max-width:calc(50% - 8px);min-width:480px;border:1px solid #eaeef2}"""


def write_html(rows: list[dict[str, Any]], sweep_dir: Path, plots: dict[str, Path] | None = None) -> Path:
    """Write sweep_dir/matrix.html from collect()'s rows (in their order); returns its path."""
    sweep_dir = Path(sweep_dir)
    models = ", ".join(sorted({str(r.get("model")) for r in rows}))
    counts = Counter(r.get("status") or "skipped" for r in rows)
    order = sorted(counts, key=lambda s: list(COLOURS).index(s) if s in COLOURS else len(COLOURS))
    head = [("sweep", str(sweep_dir)), ("model", models), ("date", datetime.now().strftime("%Y-%m-%d %H:%M")),
            ("build host", _host(rows))]
    figures = "".join(f'<img alt="{escape(t)}" title="{escape(t)}" src="{_data_uri(Path(p))}">'
                      for t, p in (plots or {}).items() if Path(p).is_file())
    html = ["<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
            f"<title>matrix: {escape(sweep_dir.name)}</title><style>{CSS}</style></head><body>",
            f"<h1>Export matrix: {escape(models)}</h1>",
            '<p class="meta">' + " &nbsp;·&nbsp; ".join(f"{k} <b>{escape(v)}</b>" for k, v in head) + "</p>",
            '<p class="chips">' + "".join(f"{_badge(s)} {counts[s]} &nbsp; " for s in order) + "</p>",
            "<h2>Cells</h2>", _table(rows)]
    html += ["<h2>Plots</h2>", f'<div class="plots">{figures}</div>'] if figures else []
    html += ["<h2>Cell details</h2>", *(_details(i, r) for i, r in enumerate(rows)), "</body></html>"]
    path = sweep_dir / "matrix.html"
    path.write_text("\n".join(html), encoding="utf-8")
    return path


def _name(r: dict[str, Any]) -> str:
    return f"{r.get('model')}/{r.get('part')} {r.get('precision')} {r.get('format')}"


def _badge(status: str | None) -> str:
    status = status or "skipped"
    return f'<span class="b" style="background:{COLOURS.get(status, OTHER)}">{escape(status.upper())}</span>'


def _num(value: Any, spec: str, unit: str = "") -> str:
    return "-" if value is None else format(value, spec) + unit


def _short(r: dict[str, Any]) -> str:
    """The table's one line: why the cell is not a plain pass."""
    if r.get("diagnosis"):
        return str(r["diagnosis"])
    if r.get("float_layers"):
        return "kept float: " + ", ".join(r["float_layers"])
    text = (r.get("error") or "").split("\n")[0] or "; ".join(r.get("warnings") or [])
    return text if len(text) <= 110 else text[:107] + "..."


def _table(rows: list[dict[str, Any]]) -> str:
    devices = list(dict.fromkeys(name for r in rows for name in r.get("devices") or {}))
    head = ["cell", "status", "size", "vs fp32", "max abs", "cosine", "accuracy", "p50 ms", "speedup",
            *devices, "why"]
    out = ["<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>"]
    for i, r in enumerate(rows):
        web = "".join(f'<td class="c">{_device_badge((r.get("devices") or {}).get(name))}</td>' for name in devices)
        numbers = [human_bytes(r.get("file_bytes")), _num(r.get("size_ratio_to_fp32"), ".2f"),
                   _num(r.get("max_abs"), ".2e"), _num(r.get("cosine"), ".5f"), _num(r.get("accuracy"), ".2%"),
                   _num(r.get("latency_p50_ms"), ".2f"), _num(r.get("speedup"), ".1f", "x")]
        out.append(f'<tr class="row" style="--c:{COLOURS.get(r.get("status"), OTHER)}"><td class="c">'
                   f'<a href="#cell-{i}">{escape(_name(r))}</a></td><td>{_badge(r.get("status"))}</td>'
                   + "".join(f'<td class="n">{escape(n)}</td>' for n in numbers)
                   + f'{web}<td class="why">{escape(_short(r))}</td></tr>')
    return "\n".join(out) + "</table>"


def _device_badge(device: dict[str, Any] | None) -> str:
    if not device or device.get("status") == "n/a":
        return "-"
    figure = f" {device['max_abs']:.1e}" if device.get("max_abs") is not None else ""
    return f"{_badge(device.get('status'))}{figure}"


def _details(i: int, r: dict[str, Any]) -> str:
    items: list[tuple[str, str]] = []
    if r.get("error"):
        items.append(("note", escape(r["error"])))
    if r.get("warnings"):
        items.append(("warnings", "<ul>" + "".join(f"<li>{escape(w)}</li>" for w in r["warnings"]) + "</ul>"))
    if r.get("float_layers"):
        items.append(("kept float", ", ".join(f"<code>{escape(m)}</code>" for m in r["float_layers"])))
    times = [f"{k} {r[key]:.2f} ms" for k, key in (("p50", "latency_p50_ms"), ("p90", "latency_p90_ms"),
                                                   ("eager p50", "eager_p50_ms")) if r.get(key)]
    threads = f", {r['threads']} thread{'s' * (r['threads'] != 1)}" if r.get("threads") else ""
    items.append(("runtime", escape(f"{r.get('runtime') or 'runtime not recorded'}{threads}"
                                    + (": " + ", ".join(times) if times else ""))))
    if profile := r.get("profile"):
        items.append(("time", _profile(profile)))
    for name, d in (r.get("devices") or {}).items():
        figures = ", ".join(f"{k} {format(d[key], spec)}" for k, key, spec in (
            ("max abs", "max_abs", ".2e"), ("cosine", "cosine", ".5f"), ("top-1", "top1_agreement", ".2%"),
            ("stream max abs", "stream_max_abs", ".2e"), ("p50 ms", "p50_ms", ".2f")) if d.get(key) is not None)
        flags = "cpu: " + " ".join(d["cpu_flags"]) if d.get("cpu_flags") else ""
        text = "; ".join(x for x in (d.get("mode"), d.get("runtime"), flags, figures, d.get("reason")) if x)
        items.append((name, f"{_badge(d.get('status'))} {escape(text)}"))
    if diagnosis := _diagnosis(r):
        items.append(("diagnosis", diagnosis))
    body = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in items)
    return (f'<section id="cell-{i}" style="--c:{COLOURS.get(r.get("status"), OTHER)}">'
            f"<h3>{_badge(r.get('status'))} {escape(_name(r))}</h3><dl>{body}</dl></section>")


def _profile(profile: dict[str, Any]) -> str:
    """Why the cell is slower than eager: the runtime's own per-operator times."""
    rows = "".join(f'<tr><td><code>{escape(o["op"])}</code></td><td>{escape(o["where"])}</td>'
                   f'<td class="n">{o["ms"]:.3g}</td><td class="n">{o["share"]:.0%}</td></tr>' for o in profile["ops"])
    more = f"<div>and {profile['others']} more operators</div>" if profile.get("others") else ""
    return (f'<div class="why">{escape(profile["why"])}</div><table><tr><th>operator</th><th>where</th>'
            f"<th>ms/call</th><th>share</th></tr>{rows}</table>{more}")


def _diagnosis(r: dict[str, Any]) -> str:
    """The suspects and, collapsed, the per-layer table, from the part's verify.json."""
    d = _read(Path(r.get("job_dir") or "-") / "artifacts" / str(r.get("part")) / "verify.json").get("diagnosis")
    if not d:
        return escape(r["diagnosis"]) if r.get("diagnosis") else ""
    errors = [f"{k.replace('_', ' ')} {d[k]:.2%}" for k in ("reference_error", "runtime_error")
              if isinstance(d.get(k), (int, float))]
    out = [f'<div class="why">relative output error vs eager: {escape(", ".join(errors))}</div>'] if errors else []
    at = d.get("runtime_diverges_at") or {}
    if at.get("why") and not at.get("module"):  # with a module it heads the suspects
        out.append(f"<div>runtime vs program: {escape(at['why'])}</div>")
    suspects = d.get("suspects") or []
    out += ["<ol>" + "".join(f"<li><code>{escape(str(s.get('module')))}</code> ({escape(str(s.get('type', '?')))}):"
                             f' <span class="why">{escape(str(s.get("why", "")))}</span></li>' for s in suspects)
            + "</ol>"] if suspects else [
        f"<div>{escape(d.get('note') or 'no layer stands out: the error builds up across the model')}</div>"]
    layers, named = d.get("layers") or [], {s.get("module") for s in suspects}
    if layers:
        rows = "".join(f'<tr{" class=suspect" if x.get("module") in named else ""}><td><code>'
                       f'{escape(str(x.get("module")))}</code></td><td>{escape(str(x.get("type", "?")))}</td>'
                       + "".join(f'<td class="n">{_num(x.get(k), spec)}</td>' for k, spec in
                                 (("error", ".2%"), ("max_abs", ".2e"), ("cosine", ".5f"))) + "</tr>"
                       for x in layers)
        out.append(f"<details><summary>per-layer error vs eager ({len(layers)} layers)</summary><table><tr>"
                   f"<th>module</th><th>type</th><th>relative</th><th>max abs</th><th>cosine</th></tr>{rows}"
                   "</table></details>")
    return "".join(out)


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _host(rows: list[dict[str, Any]]) -> str:
    """The build host's CPU from the first job's manifest.json, else this machine's."""
    for r in rows:
        if isinstance(cpu := _read(Path(r.get("job_dir") or "-") / "manifest.json").get("host_cpu"), dict):
            break
    else:
        from .versions import host_cpu

        cpu = host_cpu()
    flags = " ".join(k for k in ("avx2", "avx512", "vnni", "fp16") if cpu.get(k))
    return f"{cpu.get('model', '?')} ({cpu.get('machine', '?')}, {cpu.get('cores', '?')} cores" \
           + (f", {flags})" if flags else ")")


def _data_uri(path: Path) -> str:
    kind = "image/svg+xml" if path.suffix == ".svg" else "image/png"
    return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode()}"


PLOTTED = ("model", "part", "precision", "format", "status", "file_bytes", "max_abs", "latency_p50_ms",
           "eager_p50_ms")


def cached_plots(rows: list[dict[str, Any]], sweep_dir: Path, cache_dir: Path | None) -> dict[str, Path]:
    """plots(), drawn once per content: an entry of the stage cache (stage `matrix_plots`) keyed
    by what the plots show and this module's code, linked into the sweep dir; a warm sweep does
    not draw (matplotlib costs a second). Without a cache dir, drawn every time."""
    from .cache import Cache, compute_key
    from .digests import link_or_copy

    if cache_dir is None:
        return plots(rows, sweep_dir)
    cache = Cache(Path(cache_dir))
    key = compute_key({"stage": "matrix_plots", "code": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
                       "points": [[r.get(field) for field in PLOTTED] for r in rows]})
    entry = cache.lookup(key)
    if entry is None:
        with cache.lock(key), cache.building("matrix_plots") as tmp:
            titles = {title: path.name for title, path in plots(rows, tmp / "files").items()}
            entry = cache.commit(key, tmp, {"stage": "matrix_plots", "result": titles})
    out = {}
    for title, name in entry.result.items():
        link_or_copy(entry.files / name, Path(sweep_dir) / name)
        out[title] = Path(sweep_dir) / name
    return out


def plots(rows: list[dict[str, Any]], sweep_dir: Path) -> dict[str, Path]:
    """matrix_size.png (KiB vs worst max abs) and, when a row has a latency, matrix_latency.png
    (p50 ms vs worst max abs, the eager p50 as a vertical line per model/part); title -> path."""
    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # its font-cache notice is not the run
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    sweep_dir = Path(sweep_dir)
    several = len({(r.get("model"), r.get("part")) for r in rows}) > 1

    def error(r):
        return max(r["max_abs"], 1e-9)

    def figure(key, scale, xlabel, name, extra=None):
        points = sorted((r for r in rows if r.get(key) and r.get("max_abs") is not None
                         and math.isfinite(r["max_abs"])), key=error, reverse=True)
        fig, axes = plt.subplots(figsize=(6.4, 4.2), dpi=110)
        for r in points:
            axes.scatter(r[key] * scale, error(r), color=COLOURS.get(r.get("status"), OTHER), zorder=3)
        if extra:
            extra(axes)
        axes.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="worst max abs error vs eager",
                 title=name.removeprefix("matrix_").removesuffix(".png") + " vs error")
        axes.margins(0.12)
        axes.autoscale_view()
        placed: list[tuple[float, float]] = []
        for r in points:  # labels right of their point, stepped down where they would overlap
            x, y = axes.transData.transform((r[key] * scale, error(r)))
            dy = 5
            while any(abs(x - px) < 80 and abs(y + dy - py) < 11 for px, py in placed):
                dy -= 11
            placed.append((x, y + dy))
            axes.annotate(f"{r.get('part') + ' ' if several else ''}{r.get('precision')} {r.get('format')}",
                          (r[key] * scale, error(r)), textcoords="offset pixels", xytext=(7, dy), fontsize=7.5)
        axes.grid(True, which="both", alpha=0.3)
        low, high = axes.get_xlim()  # ticks read 0.2 and 300, not 2x10^-1; minor ones on a short axis
        short = math.log10(high / low) < 1.5
        axes.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axes.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if short and round(
            v / 10 ** math.floor(math.log10(v))) in (2, 3, 5) else ""))
        handles = [Line2D([], [], marker="o", ls="", color=c, label=s) for s, c in COLOURS.items()
                   if any(r.get("status") == s for r in points)]
        axes.legend(handles=handles + axes.get_legend_handles_labels()[0], fontsize=7.5, loc="best")
        fig.tight_layout()
        fig.savefig(sweep_dir / name, metadata={"Software": None})  # no URL in the file
        plt.close(fig)
        return sweep_dir / name

    def eager_lines(axes):
        eager: dict[tuple, float] = {}
        for r in sorted(rows, key=lambda r: r.get("precision") != "fp32"):  # the fp32 job's measurement first
            if r.get("eager_p50_ms"):
                eager.setdefault((r.get("model"), r.get("part")), r["eager_p50_ms"])
        for (model, part), ms in eager.items():
            axes.axvline(ms, color=OTHER, ls="--", lw=1,
                         label=f"eager PyTorch p50{f' {model}/{part}' if several else ''} ({ms:.2f} ms)")

    out = {"size vs error": figure("file_bytes", 1 / 1024, "artifact size (KiB)", "matrix_size.png")}
    if any(r.get("latency_p50_ms") for r in rows):
        out["latency vs error"] = figure("latency_p50_ms", 1, "latency p50 (ms, native runtime)",
                                         "matrix_latency.png", eager_lines)
    return out
