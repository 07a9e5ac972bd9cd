"""`make ui`: the local export panel (FastAPI + uvicorn, bound to 127.0.0.1).

Pick a model entry or a checkpoint file (scanned from the folders given, newest first), a
recipe or the cells (format x precision x target) and overrides; start; follow the run live
from its event stream (pipelines/events.py); read the cell table, plots, diagnoses and per-device
verification; download a cell's artifact with its io.json and test cases as one zip; browse
earlier runs and sweeps. Every run is the command line's own `python run.py -m ...`, shown on
the page, so it can be repeated from a shell. Runs go one at a time; a second one queues.
It serves only files under the outputs folder and lists only the checkpoint folders given.

    python -m pipelines.ui [--port 8765] [--folders checkpoints ...] [--outputs outputs]
"""
from __future__ import annotations

import argparse
import io
import json
import queue
import shlex
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse, HTMLResponse, Response
from pydantic import BaseModel

from .events import EVENTS, progress, read

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".pt2", ".ptl", ".jit", ".ckpt", ".bin", ".safetensors", ".nemo")
PAGE = Path(__file__).with_name("ui_page.html")
CONSOLE_TAIL = 4000  # characters of a failed run's console the page shows


class RunRequest(BaseModel):
    """What the panel's form sends: a model entry or a checkpoint file, a recipe or cells."""

    model: str = ""  # a conf/model entry
    checkpoint: str = ""  # or a file (model=graph): one of the listed ones
    inputs: str = ""  # model.inputs for a graph file, as on the command line: [[1,1,8,8]]
    recipe: str = ""  # a conf/recipe entry, or "" for the cells below
    formats: list[str] = []
    precisions: list[str] = []
    target: str = ""
    overrides: str = ""  # more key=value overrides, shell-quoted


@dataclass
class Run:
    id: str  # its directory, relative to the outputs folder
    command: list[str]
    state: str = "queued"  # queued, running, done, failed
    returncode: int | None = None
    queued_at: float = field(default_factory=time.time)


class Panel:
    """The runs the panel started (one at a time, a queue behind it) and what it may read."""

    def __init__(self, outputs: Path, folders: list[Path]):
        self.outputs, self.folders = outputs.resolve(), [f.resolve() for f in folders]
        self.outputs.mkdir(parents=True, exist_ok=True)  # a fresh clone has no outputs/ yet
        self.runs: dict[str, Run] = {}
        self.pending: queue.Queue[Run] = queue.Queue()
        threading.Thread(target=self._work, daemon=True).start()

    def options(self) -> dict[str, Any]:
        names = lambda group: sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))  # noqa: E731
        return {"models": [m for m in names("model") if m not in ("graph", "scale")], "recipes": names("recipe"),
                "formats": names("format"), "precisions": names("precision"), "targets": names("target"),
                "checkpoints": self.checkpoints()}

    def checkpoints(self) -> list[dict[str, Any]]:
        """The checkpoint files under the folders given, newest first."""
        found = [p for folder in self.folders if folder.is_dir() for p in folder.rglob("*")
                 if p.suffix in CHECKPOINT_SUFFIXES and p.is_file()]
        found.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        return [{"path": str(p), "bytes": p.stat().st_size, "modified": p.stat().st_mtime} for p in found]

    def command(self, request: RunRequest, sweep_dir: Path) -> list[str]:
        """The `python run.py -m ...` this request is."""
        args = [sys.executable, "run.py", "-m"]
        if request.checkpoint:
            if request.checkpoint not in {c["path"] for c in self.checkpoints()}:
                raise HTTPException(400, f"{request.checkpoint} is not a checkpoint in the folders the panel was given")
            args += ["model=graph", f"model.checkpoint={request.checkpoint}"]
            args += [f"model.inputs={request.inputs}"] if request.inputs.strip() else []
        elif request.model:
            args.append(f"model={request.model}")
        if request.recipe:
            args.append(f"recipe={request.recipe}")
        args += [f"format={','.join(request.formats)}"] if request.formats else []
        args += [f"precision={','.join(request.precisions)}"] if request.precisions else []
        args += [f"target={request.target}"] if request.target else []
        try:
            extra = shlex.split(request.overrides)
        except ValueError as exc:
            raise HTTPException(400, f"overrides: {exc}") from exc
        if any(o.split("=", 1)[0].lstrip("+~").startswith("hydra.sweep") for o in extra):
            raise HTTPException(400, "overrides: the panel chooses hydra.sweep.dir (it shows each run's)")
        return args + extra + [f"hydra.sweep.dir={sweep_dir}"]

    def submit(self, request: RunRequest) -> Run:
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S") + f"_{len(self.runs):03d}"
        run = Run(f"ui/{stamp}", self.command(request, self.outputs / "ui" / stamp))
        self.runs[run.id] = run
        self.pending.put(run)
        return run

    def _work(self) -> None:
        while True:
            run = self.pending.get()
            directory = self.outputs / run.id
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "command.txt").write_text(shlex.join(["python", *run.command[1:]]) + "\n")
            run.state = "running"
            with open(directory / "console.txt", "wb") as console:
                run.returncode = subprocess.call(run.command, cwd=ROOT, stdout=console, stderr=subprocess.STDOUT)
            run.state = "done" if run.returncode == 0 else "failed"

    def inside(self, run_id: str, *parts: str) -> Path:
        """A path under the outputs folder, or 404: nothing else is served."""
        path = self.outputs.joinpath(run_id, *parts).resolve()
        if not path.is_relative_to(self.outputs) or not path.exists():
            raise HTTPException(404, "no such run or file under the panel's outputs")
        return path

    def listing(self) -> list[dict[str, Any]]:
        """The panel's runs and every earlier sweep or run with a report, newest first (the stage
        cache, outputs/cache, is not walked)."""
        found = {str(p.parent.relative_to(self.outputs)) for top in self.outputs.iterdir()
                 if top.is_dir() and top.name != "cache" for name in (EVENTS, "matrix.json")
                 for p in top.glob(f"**/{name}") if not (p.parent.parent / name).exists()}  # sweeps, not cells
        rows = [{"id": run_id, "state": self.runs[run_id].state if run_id in self.runs else "done",
                 "modified": (self.outputs / run_id).stat().st_mtime if (self.outputs / run_id).exists()
                 else time.time()} for run_id in found | set(self.runs)]
        return sorted(rows, key=lambda r: r["modified"], reverse=True)

    def status(self, run_id: str, since: int = 0) -> dict[str, Any]:
        run = self.runs.get(run_id)
        directory = self.outputs / run_id
        if run is None:
            directory = self.inside(run_id)
        events = read(directory / EVENTS)
        matrix = directory / "matrix.json"
        command = directory / "command.txt"
        console = directory / "console.txt"
        state = run.state if run else "done"
        return {"id": run_id, "state": state,
                # what the command printed, for a run that failed (a config it refused: no events)
                "console": console.read_text(errors="replace")[-CONSOLE_TAIL:]
                if state == "failed" and console.exists() else "",
                "command": shlex.join(["python", *run.command[1:]]) if run else
                (command.read_text().strip() if command.exists() else ""),
                "progress": progress(events) if events else None, "events": events[since:], "next": len(events),
                "rows": json.loads(matrix.read_text()) if matrix.exists() else None,
                "plots": [p.name for p in sorted(directory.glob("matrix_*.png"))]}

    def archive(self, run_id: str, cell: str, part: str) -> bytes:
        """A cell's artifacts/<part> folder (the artifact, io.json, test cases...) as one zip."""
        folder = self.inside(run_id, cell, "artifacts", part)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    archive.write(path, Path(part) / path.relative_to(folder))
        return buffer.getvalue()


def app(panel: Panel) -> FastAPI:
    api = FastAPI(title="export panel", docs_url=None, redoc_url=None)

    @api.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.read_text()

    @api.get("/api/options")
    def options() -> dict[str, Any]:
        return panel.options()

    @api.get("/api/runs")
    def runs() -> list[dict[str, Any]]:
        return panel.listing()

    @api.post("/api/runs")
    def start(request: RunRequest) -> dict[str, Any]:
        run = panel.submit(request)
        return {"id": run.id, "state": run.state, "command": shlex.join(["python", *run.command[1:]])}

    @api.get("/api/run")
    def status(id: str, since: int = 0) -> dict[str, Any]:
        return panel.status(id, since)

    @api.get("/api/file")
    def file(id: str, path: str) -> FileResponse:
        return FileResponse(panel.inside(id, path))

    @api.get("/api/download")
    def download(id: str, cell: str, part: str) -> Response:
        name = f"{cell}_{part}.zip"
        return Response(panel.archive(id, cell, part), media_type="application/zip",
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})

    return api


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--folders", nargs="*", type=Path, default=[ROOT / "checkpoints"],
                        help="folders scanned for checkpoint files (default: checkpoints/)")
    parser.add_argument("--outputs", type=Path, default=ROOT / "outputs", help="runs go and are read here")
    args = parser.parse_args(argv)
    print(f"export panel: http://127.0.0.1:{args.port}/  (runs in {args.outputs / 'ui'})", flush=True)
    uvicorn.run(app(Panel(args.outputs, args.folders)), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
