"""stages/runtimes/browser.py: ONNX models in onnxruntime-web (wasm) in headless Chromium agree
with native onnxruntime. Tests that need the browser skip, naming the reason, when
available() says it is missing (install: web/install.sh)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from stages.runtimes.browser import BrowserUnavailable, WebSession, available, pack, unpack
from tests.conftest import unavailable

RNG = np.random.default_rng(0)
W = RNG.standard_normal((8, 16)).astype(np.float32)
TABLE = RNG.standard_normal((100, 4)).astype(np.float32)


def _model(path: Path, external: bool = False) -> Path:
    """x (n, 8) float -> relu(x @ W + b); ids (n,) int64 -> TABLE[ids] and ids + 1 (int64)."""
    nodes = [helper.make_node(op, inputs, [output]) for op, inputs, output in (
        ("MatMul", ["x", "W"], "xw"), ("Add", ["xw", "b"], "xwb"), ("Relu", ["xwb"], "y"),
        ("Gather", ["table", "ids"], "emb"), ("Add", ["ids", "one"], "next_ids"))]
    inits = [numpy_helper.from_array(value, name) for name, value in (
        ("W", W), ("b", np.linspace(-1, 1, 16, dtype=np.float32)), ("table", TABLE),
        ("one", np.array(1, np.int64)))]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8]),
                        helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info(name, kind, None) for name, kind in (
            ("y", TensorProto.FLOAT), ("emb", TensorProto.FLOAT), ("next_ids", TensorProto.INT64))],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
              location=path.name + ".data", size_threshold=0)
    return path


def _feed(n: int = 3) -> dict[str, np.ndarray]:
    return {"x": RNG.standard_normal((n, 8)).astype(np.float32),
            "ids": RNG.integers(0, 100, n).astype(np.int64)}


def _native(model: Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, feed)


@pytest.fixture(scope="module")
def browser() -> None:
    if reason := available():
        unavailable(f"browser runtime unavailable: {reason}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, browser):
    model = _model(tmp_path_factory.mktemp("web") / "tiny.onnx")
    with WebSession(model) as session:
        yield model, session


def test_fp32_and_int64_match_native(tiny):
    model, session = tiny
    feed = _feed()
    web, native = session.run(feed), _native(model, feed)
    assert [a.dtype for a in web] == [np.float32, np.float32, np.int64]
    for got, want in zip(web, native):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert np.array_equal(web[2], feed["ids"] + 1)


def test_run_many_is_run_per_feed(tiny):
    model, session = tiny
    feeds = [_feed(n) for n in (1, 4, 2)]
    for got, feed in zip(session.run_many(feeds), feeds):
        for a, b in zip(got, _native(model, feed)):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_latency_and_info(tiny):
    _, session = tiny
    times = session.latency(_feed(), warmup=2, runs=5)
    assert len(times) == 5 and all(t > 0 for t in times)
    info = session.info
    assert info["backend"] == "wasm" and info["threads"] == 1 and info["onnxruntime_web"] == "1.30.0"
    assert info["chromium"].startswith(("Chrome/", "HeadlessChrome/")) and info["startup_s"]["total"] > 0


def test_external_data_loads_with_two_threads(tmp_path, browser):
    model = _model(tmp_path / "ext.onnx", external=True)
    assert (tmp_path / "ext.onnx.data").stat().st_size > TABLE.nbytes
    feed = _feed()
    with WebSession(model, threads=2) as session:
        web = session.run(feed)
        assert session.info["threads"] == 2 and session.info["cross_origin_isolated"]
    for got, want in zip(web, _native(model, feed)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_closing_leaves_nothing_in_tmp(tmp_path, browser):
    """Chromium's singleton-socket directory is removed with the profile (a sweep opens many)."""
    before = set(Path(tempfile.gettempdir()).glob("org.chromium.Chromium.*"))
    with WebSession(_model(tmp_path / "m.onnx")) as session:
        session.run(_feed())
    assert set(Path(tempfile.gettempdir()).glob("org.chromium.Chromium.*")) <= before


def test_every_dtype_round_trips(tmp_path, browser):
    """float16, int32, uint8, int8, bool and string tensors cross both ways unchanged."""
    kinds = {"f16": TensorProto.FLOAT16, "i32": TensorProto.INT32, "u8": TensorProto.UINT8,
             "i8": TensorProto.INT8, "b": TensorProto.BOOL, "s": TensorProto.STRING}
    graph = helper.make_graph(
        [helper.make_node("Identity", [k], [k + "_out"]) for k in kinds], "identity",
        [helper.make_tensor_value_info(k, t, None) for k, t in kinds.items()],
        [helper.make_tensor_value_info(k + "_out", t, None) for k, t in kinds.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "identity.onnx"))
    feed = {"f16": np.array([[1.5, -2.25, 65504]], np.float16), "i32": np.array([-(2**31), 7], np.int32),
            "u8": np.arange(250, 256, dtype=np.uint8), "i8": np.array([-128, 127], np.int8),
            "b": np.array([[True, False]]), "s": np.array([["héllo", "", "wörld"]], dtype=object)}
    with WebSession(tmp_path / "identity.onnx") as session:
        web = session.run(feed)
    for (name, sent), got in zip(feed.items(), web):
        assert got.dtype == sent.dtype and got.shape == sent.shape and np.array_equal(got, sent), name


def test_pack_round_trips_without_a_browser():
    feeds = [{"a": np.arange(5, dtype=np.int64).reshape(5, 1), "b": np.zeros((0, 3), np.float32),
              "c": np.float32(2.5), "s": np.array(["x", "yz"])}]
    [[*arrays]] = unpack(pack(feeds))
    for (name, want), (got_name, got) in zip(feeds[0].items(), arrays):
        assert name == got_name and got.shape == np.shape(want)
        assert np.array_equal(got.astype(want.dtype), want)


def test_missing_or_broken_chromium_is_unavailable(tmp_path):
    assert "no Chromium" in available("/nonexistent/chromium")
    model = _model(tmp_path / "tiny.onnx")
    with pytest.raises(BrowserUnavailable, match="no Chromium"):
        WebSession(model, executable="/nonexistent/chromium")
    if available("/bin/false") is None:  # there, but exits at once: a failed launch
        with pytest.raises(BrowserUnavailable, match="did not start"):
            WebSession(model, executable="/bin/false")
