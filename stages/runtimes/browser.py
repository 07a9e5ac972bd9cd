"""An ONNX model run in onnxruntime-web (wasm backend) inside headless Chromium: the runtime a
web artifact really ships to.

    with WebSession(Path("model.onnx"), threads=1) as web:
        outputs = web.run({"image": x})          # numpy arrays, graph output order
        ms = web.latency({"image": x}, warmup=3, runs=20)

One Chromium per session, driven over the DevTools protocol on a pipe (--remote-debugging-pipe:
no port, no websocket, no extra package). A threading HTTP server on 127.0.0.1 serves web/page,
onnxruntime-web's dist from web/node_modules, the model files and the tensors, which cross as raw
bytes both ways (see web/page/runner.js for the pack format). Install: web/install.sh.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

WEB = Path(__file__).resolve().parents[2] / "web"
PAGE = WEB / "page"
DIST = WEB / "node_modules" / "onnxruntime-web" / "dist"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
SHM = "/dev/shm"
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--disable-default-apps", "--no-default-browser-check",
         "--mute-audio", "--disable-background-timer-throttling", "--disable-renderer-backgrounding",
         "--remote-debugging-pipe")
DTYPES = ("float32", "float16", "float64", "int64", "uint64", "int32", "uint32", "int16", "uint16",
          "int8", "uint8", "bool")
TYPES = {".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript",
         ".wasm": "application/wasm"}


class BrowserUnavailable(Exception):
    """The browser runtime cannot run here; the message is a one-line reason."""


def chromium_available(executable: str | None = None) -> str | None:
    """None if the Chromium executable is there (no launch), else the reason."""
    executable = executable or CHROMIUM
    if not (shutil.which(executable) or os.access(executable, os.X_OK)):
        return f"no Chromium at {executable} (run web/install.sh)"
    return None


def available(executable: str | None = None) -> str | None:
    """None if a WebSession can start (cheap: files only, no launch), else the reason."""
    if reason := chromium_available(executable):
        return reason
    if not (DIST / "ort.wasm.min.mjs").is_file():
        return f"onnxruntime-web is not installed in {WEB / 'node_modules'} (run web/install.sh)"
    if not (PAGE / "runner.js").is_file():
        return f"the runner page is missing: {PAGE}"
    return None


# --- tensors as bytes: the pack format of web/page/runner.js ---------------------------------

def pack(feeds: list[dict[str, np.ndarray]]) -> bytes:
    """Feeds as one pack: u32 header length, JSON header, padding to 8, 8-aligned raw tensors."""
    items, chunks, offset = [], [], 0
    for feed in feeds:
        tensors = []
        for name, value in feed.items():
            array = np.asarray(value)
            if array.dtype.kind in "UOS":  # ort-web string tensors take a list of JS strings
                strings = [s.decode() if isinstance(s, bytes) else str(s) for s in array.ravel().tolist()]
                tensors.append({"name": name, "dtype": "string", "shape": list(array.shape),
                                "strings": strings})
                continue
            if array.dtype.name not in DTYPES:
                raise TypeError(f"input {name!r}: dtype {array.dtype} has no onnxruntime-web tensor type")
            data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            tensors.append({"name": name, "dtype": array.dtype.name, "shape": list(array.shape),
                            "offset": offset, "nbytes": len(data)})
            chunks.append(data + bytes(-len(data) % 8))
            offset += len(data) + (-len(data) % 8)
        items.append(tensors)
    header = json.dumps({"items": items}).encode()
    return b"".join([len(header).to_bytes(4, "little"), header, bytes(-(4 + len(header)) % 8), *chunks])


def unpack(blob: bytes) -> list[list[tuple[str, np.ndarray]]]:
    """A pack back as lists of (name, array), dtype and shape preserved."""
    size = int.from_bytes(blob[:4], "little")
    header = json.loads(blob[4:4 + size])
    base = 4 + size + (-(4 + size) % 8)
    items = []
    for tensors in header["items"]:
        arrays = []
        for t in tensors:
            if t["dtype"] == "string":
                array = np.array(t["strings"], dtype=object).reshape(t["shape"])
            else:
                start = base + t["offset"]
                little = np.dtype(t["dtype"]).newbyteorder("<")
                array = np.frombuffer(blob[start:start + t["nbytes"]], dtype=little)
                array = array.astype(array.dtype.newbyteorder("="), copy=False).reshape(t["shape"])
            arrays.append((t["name"], array))
        items.append(arrays)
    return items


# --- the HTTP server ---------------------------------------------------------------------------

class _Server(ThreadingHTTPServer):
    """127.0.0.1, a free port: / is web/page, /ort/ onnxruntime-web's dist, /model/ the model's
    files (nothing else), /blob/<id> in-memory packs (GET inputs, POST outputs). Cross-origin
    isolated (COOP/COEP), so SharedArrayBuffer and so wasm threads are available."""

    daemon_threads = True

    def __init__(self, model_files: dict[str, Path]):
        self.model_files = model_files
        self.blobs: dict[str, bytes] = {}
        super().__init__(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    def file(self, path: str) -> Path | None:
        if path.startswith("/model/"):
            return self.model_files.get(path[len("/model/"):])
        if path.startswith("/ort/"):
            root, rest = DIST, path[len("/ort/"):]
        else:
            root, rest = PAGE, path.lstrip("/") or "index.html"
        file = (root / rest).resolve()
        return file if file.is_file() and file.is_relative_to(root.resolve()) else None


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive: one connection for many runs,
    disable_nagle_algorithm = True  # and no 40 ms delayed-ACK stall between header and body

    def do_GET(self):
        path = self.path.split("?")[0]
        if path.startswith("/blob/"):
            body = self.server.blobs.get(path[len("/blob/"):])
        else:
            file = self.server.file(path)
            body = file.read_bytes() if file else None
        if body is None:
            return self._send(404, b"not found", "text/plain")
        # the page and onnxruntime-web may be cached (preloads need it); models and tensors not
        cache = "no-store" if path.startswith(("/blob/", "/model/")) else "max-age=600"
        self._send(200, body, TYPES.get(Path(path).suffix, "application/octet-stream"), cache)

    def do_POST(self):
        path = self.path.split("?")[0]
        if not path.startswith("/blob/"):
            return self._send(404, b"not found", "text/plain")
        self.server.blobs[path[len("/blob/"):]] = self.rfile.read(int(self.headers["Content-Length"]))
        self._send(200, b"ok", "text/plain")

    def _send(self, status: int, body: bytes, kind: str, cache: str = "no-store"):
        self.send_response(status)
        for key, value in (("Content-Type", kind), ("Content-Length", str(len(body))),
                           ("Cross-Origin-Opener-Policy", "same-origin"),
                           ("Cross-Origin-Embedder-Policy", "require-corp"),
                           ("Cross-Origin-Resource-Policy", "same-origin"), ("Cache-Control", cache)):
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # quiet: errors surface through the page
        pass


# --- Chromium over the DevTools protocol on a pipe --------------------------------------------

class Chromium:
    """Headless Chromium; CDP messages are NUL-terminated JSON on fd 3 (to it) and fd 4 (from it)."""

    def __init__(self, executable: str, profile: Path, url: str):
        to_r, self._to = os.pipe()
        self._from, from_w = os.pipe()
        log = open(profile / "chromium.log", "wb")
        # posix_spawn maps the pipes to fds 3 and 4 without a preexec_fn (unsafe with threads)
        actions = [(os.POSIX_SPAWN_DUP2, to_r, 3), (os.POSIX_SPAWN_DUP2, from_w, 4),
                   (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                   (os.POSIX_SPAWN_DUP2, log.fileno(), 1), (os.POSIX_SPAWN_DUP2, log.fileno(), 2)]
        argv = [executable, *FLAGS, f"--user-data-dir={profile}", url]
        try:
            # its own process group: closed as one (renderers too), and out of reach of Ctrl-C
            self.pid = os.posix_spawn(executable, argv, os.environ, file_actions=actions, setpgroup=0)
        except OSError as exc:
            os.close(self._to), os.close(self._from)
            raise BrowserUnavailable(f"cannot start {executable}: {exc.strerror}") from exc
        finally:
            os.close(to_r), os.close(from_w), log.close()
        self.log = profile / "chromium.log"
        self._ids = itertools.count(1)
        self._waiting: dict[int, list] = {}  # id -> [event, message]
        self.console: list[str] = []
        self.dead: str | None = None
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        buffer = b""
        while chunk := os.read(self._from, 1 << 20):
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for raw in messages:
                self._dispatch(json.loads(raw))
        self._fail("Chromium exited: " + self._log_tail())

    def _dispatch(self, message: dict):
        if "id" in message:
            with self._lock:
                waiter = self._waiting.pop(message["id"], None)
            if waiter:
                waiter[1] = message
                waiter[0].set()
            return
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
            self.console = [*self.console[-19:], f"{params['type']}: {text}"]
        elif method == "Runtime.exceptionThrown":
            self.console.append("exception: " + _error_text(params["exceptionDetails"]))
        elif method in ("Inspector.targetCrashed", "Target.detachedFromTarget"):
            self._fail(f"the page crashed ({method}): out of memory?")

    def _fail(self, reason: str):
        with self._lock:
            self.dead = self.dead or reason
            waiting, self._waiting = self._waiting, {}
        for waiter in waiting.values():
            waiter[0].set()

    def _log_tail(self) -> str:
        try:  # the profile (and the log in it) is gone if we closed it ourselves
            lines = [line for line in self.log.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            lines = []
        return lines[-1][:300] if lines else "no output"

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 60) -> dict:
        """One CDP command; its result, or RuntimeError with the protocol's message."""
        key = next(self._ids)
        waiter = [threading.Event(), None]
        message = {"id": key, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        with self._lock:
            if self.dead:
                raise RuntimeError(self.dead)
            self._waiting[key] = waiter
            try:
                os.write(self._to, json.dumps(message).encode() + b"\0")
            except OSError as exc:  # the pipe's reader is gone: Chromium exited
                raise RuntimeError(f"Chromium exited ({exc.strerror})") from exc
        if not waiter[0].wait(timeout):
            raise TimeoutError(f"{method}: no answer from Chromium in {timeout:.0f} s")
        if waiter[1] is None:
            raise RuntimeError(self.dead)
        if "error" in waiter[1]:
            raise RuntimeError(f"{method}: {waiter[1]['error'].get('message')}")
        return waiter[1]["result"]

    def page_session(self, timeout: float = 30) -> str:
        """The DevTools session of the page Chromium opened at launch."""
        deadline = time.monotonic() + timeout
        while not (pages := [t["targetId"] for t in self.send("Target.getTargets")["targetInfos"]
                             if t["type"] == "page"]):
            if time.monotonic() > deadline:
                raise TimeoutError(f"Chromium opened no page in {timeout:.0f} s")
            time.sleep(0.01)
        return self.send("Target.attachToTarget", {"targetId": pages[0], "flatten": True})["sessionId"]

    def close(self):
        """SIGKILL to its whole process group: the profile is thrown away, so nothing needs an
        orderly exit (Browser.close takes ~0.5 s; after SIGTERM its helpers linger ~1.5 s)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        os.close(self._to)
        with contextlib.suppress(OSError):  # its singleton socket's directory in $TMPDIR, which
            # only an orderly exit removes (the profile's SingletonSocket links to it)
            shutil.rmtree(Path(os.readlink(self.log.with_name("SingletonSocket"))).parent)


# --- the session -------------------------------------------------------------------------------

def environment() -> dict[str, Any]:
    """What a browser check depends on, read cheaply (for a cache key): the Chromium binary and
    the installed onnxruntime-web."""
    chromium = Path(shutil.which(CHROMIUM) or CHROMIUM)
    package = DIST.parent / "package.json"
    return {"chromium": [chromium.stat().st_size, chromium.stat().st_mtime_ns] if chromium.exists() else None,
            "onnxruntime_web": json.loads(package.read_text())["version"] if package.exists() else None}


def session(model: Path, threads: int = 1) -> WebSession:
    """A WebSession on the model (the runtime module contract, stages/runtimes/__init__.py)."""
    return WebSession(model, threads)


class WebSession:
    """One model in onnxruntime-web (wasm, a fixed thread count) in one headless Chromium page."""

    def __init__(self, model: Path, threads: int = 1, executable: str | None = None,
                 timeout: float = 300):
        if threads < 1:
            raise ValueError(f"threads must be >= 1, not {threads}")
        executable = executable or CHROMIUM
        if reason := available(executable):
            raise BrowserUnavailable(reason)
        self.timeout = timeout
        self._blob_ids = itertools.count()
        started = time.perf_counter()
        model = Path(model)
        files = {model.name: model, **{name: model.parent / name for name in _external_files(model)}}
        self._server = _Server(files)
        # a throwaway profile, in memory where possible (deleting ~200 files from disk takes ~0.3 s)
        memory = SHM if os.access(SHM, os.W_OK) else None
        self._profile = Path(tempfile.mkdtemp(prefix="ort-web-", dir=memory))
        self._browser = None
        try:
            self._browser = Chromium(shutil.which(executable) or executable, self._profile,
                                      self._server.url + "/index.html")
            launched = time.perf_counter()
            self._session = self._open_page()
        except (BrowserUnavailable, RuntimeError, TimeoutError, OSError) as exc:
            self.close()
            raise (exc if isinstance(exc, BrowserUnavailable) else
                   BrowserUnavailable(f"headless Chromium did not start: {exc}")) from exc
        paged = time.perf_counter()
        options = {"threads": threads, "externalData": [
            {"path": name, "url": "/model/" + name} for name in files if name != model.name]}
        try:  # from here on a failure is the model's (an op the wasm build lacks...), not the browser's
            loaded = self._eval(f"runner.load({json.dumps('/model/' + model.name)}, {json.dumps(options)})")
        except (RuntimeError, TimeoutError) as exc:
            self.close()
            raise RuntimeError(f"onnxruntime-web could not load {model.name}: {exc}") from exc
        version = self._browser.send("Browser.getVersion")
        self.info: dict[str, Any] = {
            "chromium": version["product"], "onnxruntime_web": loaded["ortVersion"],
            "backend": loaded["backend"], "threads": loaded["threads"], "simd": loaded["simd"],
            "cross_origin_isolated": loaded["crossOriginIsolated"],
            "inputs": loaded["inputNames"], "outputs": loaded["outputNames"],
            "startup_s": {"launch": round(launched - started, 3), "page": round(paged - launched, 3),
                          "model": round(time.perf_counter() - paged, 3),
                          "total": round(time.perf_counter() - started, 3)}}

    def _open_page(self) -> str:
        """The DevTools session of the page Chromium opened at launch, once runner.js is up."""
        deadline = time.monotonic() + 30
        session = self._browser.page_session(30)
        self._browser.send("Runtime.enable", session=session)
        while time.monotonic() < deadline:  # the page may still be about:blank, or navigating
            try:
                state = self._browser.send("Runtime.evaluate", {
                    "expression": "window.runner ? 'ready' : window.runnerError || ''",
                    "returnByValue": True},
                    session=session)["result"].get("value")
            except RuntimeError:  # "Cannot find default execution context": mid-navigation
                state = ""
            if state == "ready":
                return session
            if state:
                raise RuntimeError(f"runner.js failed: {state}")
            time.sleep(0.01)
        raise TimeoutError("the runner page did not start in 30 s: " + "; ".join(self._browser.console[-3:]))

    def _eval(self, expression: str) -> Any:
        """Await a JS expression in the page; its JSON value, or RuntimeError with the JS error."""
        answer = self._browser.send("Runtime.evaluate", {
            "expression": expression, "awaitPromise": True, "returnByValue": True},
            self._session, self.timeout)
        if "exceptionDetails" in answer:
            raise RuntimeError(_error_text(answer["exceptionDetails"]))
        return answer["result"].get("value")

    def _put(self, feeds: list[dict[str, np.ndarray]]) -> str:
        key = f"in{next(self._blob_ids)}"
        self._server.blobs[key] = pack(feeds)
        return key

    def run_many(self, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
        """Each feed's outputs in graph order; all feeds in one page round trip."""
        key = self._put(feeds)
        try:
            self._eval(f"runner.runUrl('/blob/{key}', '/blob/{key}.out')")
            blob = self._server.blobs.pop(f"{key}.out")
        finally:
            self._server.blobs.pop(key, None)
        return [[array for _, array in outputs] for outputs in unpack(blob)]

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The outputs of one feed, in graph order."""
        return self.run_many([feed])[0]

    def latency(self, feed: dict[str, np.ndarray], warmup: int = 3, runs: int = 20) -> list[float]:
        """Milliseconds per session.run, timed in the page (performance.now), after `warmup` runs."""
        key = self._put([feed])
        try:
            return self._eval(f"runner.time('/blob/{key}', {int(warmup)}, {int(runs)})")
        finally:
            self._server.blobs.pop(key, None)

    def describe(self) -> str:
        info = self.info
        return (f"onnxruntime-web {info['onnxruntime_web']} {info['backend']}, {info['chromium']}, "
                f"{info['threads']} thread(s)")

    def close(self) -> None:
        """Close the browser, the server and the temporary profile."""
        if self._browser:
            self._browser.close()
            self._browser = None
        self._server.shutdown()
        self._server.server_close()
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> WebSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _error_text(details: dict) -> str:
    """The first line of a JS exception as CDP reports it."""
    return details.get("exception", {}).get("description", details["text"]).splitlines()[0]


def _external_files(model: Path) -> list[str]:
    """The external-data files a model's tensors name (relative to its folder), weights not read."""
    import onnx

    def tensors(graph):
        yield from graph.initializer
        for node in graph.node:
            for attribute in node.attribute:
                yield from [attribute.t] if attribute.HasField("t") else attribute.tensors
                for sub in [attribute.g] if attribute.HasField("g") else attribute.graphs:
                    yield from tensors(sub)

    proto = onnx.load(str(model), load_external_data=False)
    return sorted({entry.value for tensor in tensors(proto.graph)
                   if tensor.data_location == onnx.TensorProto.EXTERNAL
                   for entry in tensor.external_data if entry.key == "location"})
