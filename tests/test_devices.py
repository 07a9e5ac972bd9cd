"""Device profiles: where each device of a target runs on a given host, the target's verdict from
its devices' verdicts, and artifacts really run on emulated phone and server cores (qemu-user,
built by make device-runtimes)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

import devices.install as runtimes
from stages.runtimes import devices as placing
from stages.runtimes.devices import place, profile
from tests.conftest import compose_config

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
