"""The export panel (pipelines/ui.py, `make ui`): served by uvicorn, driven in Debian's Chromium
through Playwright (no browser download), exporting the demo model for real."""
from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

import pytest

from tests.conftest import NATIVE_ONLY, ROOT, unavailable

SCREENSHOT = ROOT / "outputs" / "ui-test" / "panel.png"
CHROMIUM = "/usr/bin/chromium"


def ensure_ui_deps() -> None:
    """FastAPI, uvicorn and Playwright (requirements-ui-test.txt) into this interpreter if missing."""
    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("playwright") is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "-r", "requirements-ui-test.txt",
                        "-c", "requirements.txt"], cwd=ROOT, check=True)


@pytest.fixture(scope="module")
def panel(tmp_path_factory, demo_checkpoint):
    """`python -m pipelines.ui` on a free port, with its own outputs folder and one checkpoint folder."""
    ensure_ui_deps()
    root = tmp_path_factory.mktemp("panel")
    (root / "ckpts").mkdir()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "pipelines.ui", "--port", str(port), "--outputs",
                               str(root / "outputs"), "--folders", str(root / "ckpts")], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(url + "/api/options", timeout=2)
            break
        except OSError:
            assert server.poll() is None, server.stdout.read()
            time.sleep(0.2)
    yield url, root
    server.terminate()
    server.wait(10)


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_the_panel_serves_only_its_outputs(panel):
    url, root = panel
    (root / "outputs" / "ui").mkdir(parents=True, exist_ok=True)
    secret = root / "secret.txt"
    secret.write_text("not yours")
    for query in ({"id": "..", "path": "secret.txt"}, {"id": "ui", "path": "../../secret.txt"},
                  {"id": "ui", "path": str(secret)}, {"id": "/etc", "path": "passwd"}):
        status, body = get(f"{url}/api/file?{urllib.parse.urlencode(query)}")
        assert status == 404 and b"not yours" not in body, query
    status, body = get(f"{url}/api/download?{urllib.parse.urlencode({'id': '..', 'cell': '..', 'part': '..'})}")
    assert status == 404
    status, answer = post(f"{url}/api/runs", {"checkpoint": str(ROOT / "checkpoints" / "digits_cnn.pt")})
    assert status == 400 and "not a checkpoint in the folders" in answer["detail"]  # only the folders given
    status, answer = post(f"{url}/api/runs", {"model": "digits_cnn", "overrides": "hydra.sweep.dir=/tmp/x"})
    assert status == 400 and "hydra.sweep.dir" in answer["detail"]


def test_a_run_the_command_line_refuses_shows_why(panel):
    url, _ = panel
    status, run = post(f"{url}/api/runs", {"model": "digits_cnn", "precisions": ["int3"]})
    assert status == 200 and run["command"].startswith("python run.py -m model=digits_cnn precision=int3")
    for _ in range(120):
        state = json.loads(get(f"{url}/api/run?id={urllib.parse.quote(run['id'])}")[1])
        if state["state"] in ("done", "failed"):
            break
        time.sleep(0.5)
    assert state["state"] == "failed" and "precision/int3" in state["console"]  # Hydra's own message


def test_a_checkpoint_folder_is_listed_newest_first(panel):
    url, root = panel
    for name in ("old.pt2", "new.ptl"):
        (root / "ckpts" / name).write_bytes(b"x")
        time.sleep(0.05)
    (root / "ckpts" / "notes.txt").write_text("not a checkpoint")
    listed = [Path(c["path"]).name for c in json.loads(get(f"{url}/api/options")[1])["checkpoints"]]
    assert listed[:2] == ["new.ptl", "old.pt2"] and "notes.txt" not in listed


def test_a_user_exports_the_demo_model_in_the_browser_and_downloads_it(panel, tmp_path):
    """Click through a real export (.onnx and .pte at fp32): the command shown, the live log, the
    table with both cells passing, and a download holding the artifact with its io.json. A second
    run started meanwhile queues behind the first."""
    from playwright.sync_api import expect, sync_playwright

    if not Path(CHROMIUM).exists():
        unavailable("Debian's chromium (make test installs it: web/install.sh)")
    url, root = panel
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(accept_downloads=True)
        page.goto(url)
        page.select_option("#model", "digits_cnn")
        page.check("input[name=format][value=onnx]")
        page.check("input[name=format][value=pte]")
        page.check("input[name=precision][value=fp32]")
        page.fill("#overrides", f"{NATIVE_ONLY} cache.dir={tmp_path / 'cache'}")
        page.click("#start")
        expect(page.locator("#command")).to_contain_text("python run.py -m model=digits_cnn format=onnx,pte "
                                                         "precision=fp32", timeout=10_000)
        second = post(f"{url}/api/runs", {"model": "digits_cnn", "precisions": ["fp32"], "formats": ["onnx"],
                                          "overrides": f"{NATIVE_ONLY} cache.dir={tmp_path / 'cache'}"})[1]
        assert second["state"] == "queued"
        expect(page.locator("#log")).to_contain_text("lower ran", timeout=240_000)  # live, before the end
        rows = page.locator("#table tr[data-cell]")
        expect(rows).to_have_count(2, timeout=300_000)
        expect(page.locator("#table td.pass")).to_have_count(2)
        expect(page.locator("#progress")).to_contain_text("2/2 cells done")
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)
        with page.expect_download() as download:
            page.click("#table tr[data-cell=digits_cnn_fp32_onnx] a.download")
        saved = tmp_path / "cell.zip"
        download.value.save_as(saved)
        names = zipfile.ZipFile(saved).namelist()
        assert "classifier/model.onnx" in names and "classifier/io.json" in names
        assert any(name.startswith("classifier/test_data_set_0/") for name in names), names  # its test cases
        for _ in range(300):  # the queued run goes next, into its own sweep directory
            state = json.loads(get(f"{url}/api/run?id={urllib.parse.quote(second['id'])}")[1])
            if state["state"] in ("done", "failed"):
                break
            time.sleep(1)
        assert state["state"] == "done" and [r["status"] for r in state["rows"]] == ["pass"]
        page.reload()  # earlier runs: both listed; ticked, they are compared side by side
        done = [r["id"] for r in json.loads(get(f"{url}/api/runs")[1]) if r["state"] == "done"]
        assert second["id"] in done and len(done) == 2
        for run_id in done:
            page.check(f"#runs input.pick[value='{run_id}']")
        page.click("#compare")
        expect(page.locator("#compared h3")).to_have_count(2)
        expect(page.locator("#compared td.pass")).to_have_count(3)
        browser.close()
