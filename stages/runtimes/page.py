"""A static page in headless Chromium: its full-page screenshot and its visible text (for tests
of the HTML reports). Reuses browser.py's Chromium launcher (DevTools protocol on a pipe).

    shot = screenshot(Path("matrix.html"), width=1280)
    shot.png      # PNG bytes of the whole page, not only the viewport
    shot.text     # document.body.innerText: what a reader sees (closed <details> left out)
"""
from __future__ import annotations

import base64
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .browser import CHROMIUM, SHM, BrowserUnavailable, Chromium
from .browser import chromium_available as available  # a static page needs no onnxruntime-web


@dataclass
class Shot:
    png: bytes
    text: str
    width: int
    height: int


def screenshot(page: Path | str, width: int = 1280, executable: str | None = None,
               timeout: float = 30) -> Shot:
    """Open a local file (or an http://127.0.0.1 URL) and return its full-page PNG and text."""
    executable = executable or CHROMIUM
    if reason := available(executable):
        raise BrowserUnavailable(reason)
    url = page if isinstance(page, str) and "://" in page else Path(page).resolve().as_uri()
    profile = Path(tempfile.mkdtemp(prefix="page-", dir=SHM if os.access(SHM, os.W_OK) else None))
    browser = None
    try:
        browser = Chromium(shutil.which(executable) or executable, profile, "about:blank")
        session = browser.page_session(timeout)
        send = lambda method, params=None: browser.send(method, params, session, timeout)  # noqa: E731
        send("Page.enable")
        send("Emulation.setDeviceMetricsOverride",
             {"width": width, "height": 800, "deviceScaleFactor": 1, "mobile": False})
        send("Page.navigate", {"url": url})
        deadline = time.monotonic() + timeout
        while _evaluate(send, "document.readyState + '|' + location.href") != f"complete|{url}":
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not load in {timeout:.0f} s")
            time.sleep(0.02)
        _evaluate(send, "document.fonts.ready.then(() => true)", wait=True)
        size = send("Page.getLayoutMetrics")["cssContentSize"]
        height = int(size["height"]) + 1
        send("Emulation.setDeviceMetricsOverride",
             {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        png = send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                              "clip": {"x": 0, "y": 0, "width": width,
                                                       "height": height, "scale": 1}})["data"]
        text = _evaluate(send, "document.body.innerText")
        return Shot(base64.b64decode(png), text, width, height)
    except (RuntimeError, OSError) as exc:
        raise BrowserUnavailable(f"headless Chromium failed on {url}: {exc}") from exc
    finally:
        if browser:
            browser.close()
        shutil.rmtree(profile, ignore_errors=True)


def _evaluate(send, expression: str, wait: bool = False):
    try:
        answer = send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                           "awaitPromise": wait})
    except RuntimeError:  # "Cannot find default execution context": mid-navigation
        return None
    return answer["result"].get("value")
