"""Device profiles: where each device of a target runs on a given host, the target's verdict from
its devices' verdicts, and artifacts really run on emulated phone and server cores (qemu-user,
built by make device-runtimes)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import devices.install as runtimes
from stages.runtimes import devices as placing
from stages.runtimes.devices import place, profile
from tests.conftest import compose_config
from tests.devices import unavailable

AVX2_HOST = {"machine": "x86_64", "model": "Haswell-class", "cores": 2, "vnni": False, "avx2": True,
             "avx512": False, "fp16": False, "f16c": True}
VNNI_HOST = {**AVX2_HOST, "model": "AVX-512 VNNI class", "vnni": True, "avx512": True}
A76_HOST = {"machine": "aarch64", "model": "0xd0c", "cores": 2, "vnni": True, "avx2": False, "avx512": False,
            "fp16": True, "f16c": False}


@pytest.fixture
def host(monkeypatch):
    """Pretend to be another build host, its emulated runtimes built."""

    def be(cpu: dict, isa: str, built: bool = True) -> None:
        monkeypatch.setattr(placing, "host_cpu", lambda: cpu)
        monkeypatch.setattr(placing, "host_isa", lambda: isa)
        if built:
            monkeypatch.setattr(runtimes, "runtime_command",
                                lambda arch, model: ([f"qemu-{arch}", "-cpu", model, "python"], {}))
        else:
            monkeypatch.setattr(runtimes, "ready_tree", lambda: None)

    return be


def modes(target: str, fmt: str, emulate: bool = True) -> dict[str, str]:
    cfg = compose_config(f"target={target}", f"format={fmt}")
    return {d["name"]: place(OmegaConf.to_container(d), fmt, emulate).mode for d in cfg.target.devices}


def test_a_vnni_host_runs_vnni_natively_and_emulates_avx2_and_arm(host):
    host(VNNI_HOST, "x86_64")
    assert modes("server", "onnx") == {"x86-64-vnni": "native", "x86-64-avx2": "emulated", "neoverse-n1": "emulated"}
    assert modes("android", "pte") == {"cortex-a76": "emulated", "cortex-a53": "emulated"}


def test_an_avx2_host_runs_avx2_natively_and_says_why_vnni_cannot_run(host):
    host(AVX2_HOST, "x86_64")
    assert modes("server", "pte") == {"x86-64-vnni": "skipped", "x86-64-avx2": "native", "neoverse-n1": "emulated"}
    reason = place(profile("x86-64-vnni"), "onnx").reason
    assert "vnni" in reason and "qemu-user cannot emulate" in reason and "target.devices" in reason


def test_an_arm64_host_runs_its_own_core_natively(host):
    host(A76_HOST, "arm64")
    assert modes("android", "pte") == {"cortex-a76": "native", "cortex-a53": "emulated"}
    assert "x86-64" in place(profile("x86-64-avx2"), "onnx").reason  # its venv cannot run x86


def test_browser_takes_onnx_only_and_emulation_can_be_switched_off(host):
    host(VNNI_HOST, "x86_64")
    assert modes("any", "pte")["chromium-wasm"] == "n/a"
    off = place(profile("cortex-a76"), "pte", emulate=False)
    assert off.mode == "skipped" and "verify.emulate=false" in off.reason


def test_a_missing_runtime_tree_names_the_make_target(host):
    host(VNNI_HOST, "x86_64", built=False)
    skipped = place(profile("cortex-a76"), "pte")
    assert skipped.mode == "skipped" and "make device-runtimes" in skipped.reason


def test_the_target_verdict_is_the_conjunction_of_its_devices():
    from stages.verify_target import _verdict

    ok = {"status": "pass", "outputs": {"y": {"max_abs": 1e-6}}}
    bad = {"status": "fail", "reason": "output 'y' cosine 0.9 < 0.98"}
    skipped = {"status": "skipped", "reason": "run make device-runtimes"}
    assert _verdict("t", {"a": ok, "b": ok})["status"] == "pass"
    failed = _verdict("t", {"a": ok, "b": bad, "c": skipped})
    assert failed["status"] == "fail" and not failed["passed"] and failed["reason"].startswith("b: output 'y'")
    partial = _verdict("t", {"a": ok, "c": skipped})
    assert partial["status"] == "partial" and partial["passed"] and "c SKIPPED (run make device-runtimes)" in partial["reason"]
    assert _verdict("t", {"w": {"status": "n/a", "reason": ""}})["status"] == "n/a"


# --- on the devices themselves (emulated here unless the host is one) -------------------------

@pytest.fixture(scope="module")
def run_on_devices(tmp_path_factory):
    """The chain on a test model with its target's devices really run; the verify_target report."""
    import logging

    import stages  # noqa: F401  registers the stages
    from pipelines.runner import Runner
    from tests.tiny import write_checkpoint
    from tests.tiny_stateful import write_checkpoint as write_stream

    root = tmp_path_factory.mktemp("devices")
    checkpoints = {"tiny": write_checkpoint(root / "tiny.pt"), "tiny_stream": write_stream(root / "stream.pt")}
    runs = iter(range(100))

    def run(model: str, *overrides: str) -> tuple[dict, Path]:
        cfg = compose_config(f"model={model}", f"model.checkpoint={checkpoints[model]}", f"cache.dir={root / 'cache'}",
                             "verify.emulate=true", "calibration=synthetic", *overrides)
        run_dir = root / f"run{next(runs)}"
        run_dir.mkdir()
        part = Runner(cfg, run_dir, logging.getLogger("test")).run()[0]
        assert part.status == "pass", part.error
        return json.loads((run_dir / "artifacts" / part.part / "verify_target.json").read_text()), run_dir

    return run


A76_ONLY = "target.devices=[{name: cortex-a76, isa: arm64, cpu: cortex-a76, features: {fp16: true, vnni: true}}]"


def _require(report: dict) -> dict:
    """The devices' reports, each of which must have run (tests/devices.py: unavailable)."""
    skipped = {n: d["reason"] for n, d in report["devices"].items() if d["status"] == "skipped"}
    if skipped:
        unavailable(f"devices skipped: {skipped}")
    return report["devices"]


def test_int8_pte_passes_on_both_phone_cores_each_with_its_own_int8_path(run_on_devices):
    report, run_dir = run_on_devices("tiny", "target=android", "format=pte", "precision=int8")
    found = _require(report)
    assert report["status"] == "pass" and set(found) == {"cortex-a76", "cortex-a53"}
    for device in found.values():
        assert device["passed"] and device["top1_agreement"]["logits"] >= 0.9
    assert {"asimddp", "asimdhp"} <= set(found["cortex-a76"]["cpu"]["flags"])  # sdot, native fp16
    assert not {"asimddp", "asimdhp"} & set(found["cortex-a53"]["cpu"]["flags"])  # ARMv8.0


def test_check_artifact_runs_the_bundled_cases_on_a_device(run_on_devices, capsys):
    from pipelines.check_artifact import main

    report, run_dir = run_on_devices("tiny", "target=android", "format=pte", "precision=int8")
    _require(report)
    assert main([str(run_dir / "artifacts" / "net"), "--device", "cortex-a53"]) == 0
    assert "on cortex-a53 (3 cases" in capsys.readouterr().out


def test_fp16_on_a_v82_core_is_computed_in_fp16(run_on_devices):
    """The v8.0 core (like x86) computes an fp16 program's arithmetic in fp32, a v8.2 core in
    fp16: its outputs are its own, still within the fp16 tolerance. Both named profiles, so the
    verdict is the same on any build host (an arm64 one runs the a76 natively)."""
    report, run_dir = run_on_devices("tiny", "target=android", "format=pte", "precision=fp16")
    found = _require(report)
    assert report["status"] == "pass"
    assert found["cortex-a76"]["outputs"]["logits"]["max_abs"] != found["cortex-a53"]["outputs"]["logits"]["max_abs"]



def test_a_stateful_part_is_streamed_on_the_phone_and_in_the_browser(run_on_devices):
    pte, _ = run_on_devices("tiny_stream", "target=android", "format=pte", "precision=fp32", A76_ONLY)
    web, _ = run_on_devices("tiny_stream", "target=web", "format=onnx", "precision=fp32")
    assert list(pte["devices"]) == ["cortex-a76"]  # a device list of the user's own, on the command line
    for device in [*_require(pte).values(), *_require(web).values()]:
        assert device["passed"] and device["stream"]["chunks"] == 24 and device["stream"]["max_abs"] < 1e-4
