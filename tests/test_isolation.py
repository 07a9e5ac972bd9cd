"""Each computing stage runs in a process of its own (pipelines/isolation.py)."""
from __future__ import annotations

import dataclasses
import errno
import os
import pickle
import signal

import pytest
import torch

from pipelines.errors import PipelineError
from stages import load_checkpoint
from stages.support.state_dict_cleaning import KeysDoNotFit
from tests.conftest import ROOT

_HELD: list[bytes] = []
HOG_MB = 300


def _killed(ctx):
    (ctx.workdir / "state_dict.pt").write_bytes(b"partial")
    os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer would


def _loads_and_holds_memory(ctx):
    _HELD.append(b"\x01" * (HOG_MB * 2**20))  # a stage that keeps what it allocated
    return load_checkpoint.run(ctx)


@pytest.fixture
def replace_load(monkeypatch):
    import stages  # noqa: F401
    from pipelines.registry import STAGES

    def replace(fn):
        monkeypatch.setitem(STAGES, "load_checkpoint", dataclasses.replace(STAGES["load_checkpoint"], fn=fn))
    return replace


def test_a_stage_whose_process_is_killed_fails_that_stage_and_leaves_no_entry(run_tiny, replace_load, tmp_path):
    replace_load(_killed)
    run = run_tiny()
    assert run.status == "fail"
    assert run.error.startswith("[load_checkpoint] the stage's process was killed by SIGKILL (the kernel's OOM")
    assert "hydra.launcher.n_jobs=1" in run.error
    assert not list((tmp_path / "cache").glob("??/*")) and not any((tmp_path / "cache" / "tmp").iterdir())


def test_what_a_stage_keeps_is_returned_when_it_ends(run_tiny, replace_load):
    """The next stage's peak is its own: the memory the first one held went with its process."""
    replace_load(_loads_and_holds_memory)
    run = run_tiny()
    assert run.status == "pass", run.error
    peaks = {r.stage: r.peak_mb for r in run.records}
    assert peaks["load_checkpoint"] >= HOG_MB
    assert peaks["clean_state_dict"] < peaks["load_checkpoint"] - HOG_MB * 2 / 3
    assert not _HELD  # it never ran in this process


def test_stages_run_after_this_process_used_openmp(run_tiny):
    """GNU OpenMP hangs a child forked from a process that ran a parallel op; the stages'
    processes come from a fork server that never computes, so a job may compute first."""
    torch.set_num_threads(2)
    _ = torch.randn(512, 512) @ torch.randn(512, 512)
    run = run_tiny("format=pte", "precision=int8", "calibration=synthetic")
    assert run.status == "pass", run.error
    assert all(r.peak_mb and r.peak_mb > 0 for r in run.records)


def test_an_error_crosses_from_the_stage_process_whole():
    try:
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as exc:
            raise KeysDoNotFit("0/4 keys", fix="check model=", report={"missing": ["a"]}) from exc
    except PipelineError as error:
        error.stage = "clean_state_dict"
        copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is KeysDoNotFit and copy.report == {"missing": ["a"]}
    assert str(copy) == "[clean_state_dict] 0/4 keys\n  fix: check model="
    assert isinstance(copy.__cause__, OSError) and copy.__cause__.errno == errno.ENOSPC  # a full disk


def _imported_libraries() -> list[str]:
    import sys

    return [name for name in ("onnxruntime", "executorch.exir") if name in sys.modules]


def _fresh_server(monkeypatch, tmp_path) -> None:
    """This process's own server, not the suite's (tests/conftest.py): another environment."""
    from pipelines import isolation

    monkeypatch.setattr(isolation, "_lease", None)
    monkeypatch.setenv("PYTHON_STAGE_SERVER_TEST", str(tmp_path))  # an import-time variable: its own identity


def _wait_for(probe, expected, seconds: float = 60.0):
    import time

    from pipelines import isolation

    deadline = time.monotonic() + seconds
    while (found := isolation.call("probe", probe)[0]) != expected and time.monotonic() < deadline:
        time.sleep(0.2)
    return found


def test_the_server_preloads_the_formats_a_process_needs(monkeypatch, tmp_path):
    """An .onnx job's stages never wait for ExecuTorch's import; a job that goes on to a .pte
    cell has the server import ExecuTorch too, without a new server."""
    from pipelines import isolation

    _fresh_server(monkeypatch, tmp_path)
    isolation.start(["onnx"])
    server = isolation.call("probe", os.getppid)[0]
    assert _wait_for(_imported_libraries, ["onnxruntime"]) == ["onnxruntime"]
    isolation.start(["onnx"])  # already asked: nothing new
    isolation.start(["pte"])
    assert _wait_for(_imported_libraries, ["onnxruntime", "executorch.exir"]) == ["onnxruntime", "executorch.exir"]
    assert isolation.call("probe", os.getppid)[0] == server


def _released(folder: str) -> bool:
    return os.path.exists(os.path.join(folder, "released"))


def test_a_stage_never_waits_for_what_the_server_is_importing(monkeypatch, tmp_path):
    """Unless it names it (below), a spare forked before the server went into a long import (here prepared work that blocks
    until the test releases it) takes the stage: the stage runs, and ends, while the server
    is still inside it."""
    import time

    from pipelines import isolation, stage_server

    _fresh_server(monkeypatch, tmp_path)
    isolation.start(["onnx"])
    deadline = time.monotonic() + 120
    while stage_server.status(isolation._lease.address)["pending"] and time.monotonic() < deadline:
        time.sleep(0.2)
    isolation._lease.preload(["tests.server_probe:block_until_released"])
    while not (tmp_path / "blocking").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (tmp_path / "blocking").exists()
    assert isolation.call("probe", _released, str(tmp_path))[0] is False  # ran inside the blocked work
    assert isolation.call("probe", _released, str(tmp_path))[0] is False  # and a second: the other spare
    (tmp_path / "released").touch()


def _has(module: str) -> bool:
    import sys

    return module in sys.modules


def test_a_stage_that_names_its_libraries_is_forked_once_the_server_has_them(monkeypatch, tmp_path):
    """wrap names torch.export (@stage libraries): its process is forked after the server's
    import, however long that takes, and a library the server had not been asked for is
    imported first. (A spare importing it again would be slower than the wait.)"""
    import threading
    import time

    from pipelines import isolation, stage_server

    _fresh_server(monkeypatch, tmp_path)
    isolation.start(["onnx"])
    deadline = time.monotonic() + 120
    while stage_server.status(isolation._lease.address)["pending"] and time.monotonic() < deadline:
        time.sleep(0.2)
    blocking = "tests.server_probe:block_until_released"
    isolation._lease.preload([blocking])
    while not (tmp_path / "blocking").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    threading.Timer(1.0, (tmp_path / "released").touch).start()
    assert isolation.call("probe", _released, str(tmp_path), after=[blocking])[0] is True
    assert isolation.call("probe", _has, "tabnanny", after=["tabnanny"])[0] is True  # no stage imports it
    assert "tabnanny" in stage_server.status(isolation._lease.address)["done"]


def test_a_server_with_both_formats_libraries_and_its_prepared_work_forks_beside_no_thread(monkeypatch, tmp_path):
    """A thread in the server when it forks (tqdm's monitor, torch's intra-op pool) would leave
    a child hung on its lock: after ExecuTorch's and the ONNX exporter's imports and torchlib's
    operator list, it holds no more threads than a process that only imported them."""
    import subprocess
    import sys
    import time

    from pipelines import isolation, stage_server

    _fresh_server(monkeypatch, tmp_path)
    isolation.start(["onnx", "pte"])
    deadline = time.monotonic() + 120
    while (state := stage_server.status(isolation._lease.address))["pending"] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "stages.upstream.onnxscript:cache_torchlib_ops" in state["done"]
    server = state["pid"]
    imported_only = subprocess.run(
        [sys.executable, "-c", "import os, torch, torch._dynamo, executorch.exir, executorch.devtools, onnx, "
         "onnxruntime; "  # onnxruntime starts a thread as it loads
         "print(len(os.listdir('/proc/self/task')))"], capture_output=True, text=True, check=True).stdout
    assert len(os.listdir(f"/proc/{server}/task")) <= int(imported_only.split()[-1])


JOB = """
import json, os, sys
from pipelines import isolation
isolation.start(["onnx"])
server = isolation.call("probe", os.getppid)[0]  # a stage process's parent: the server that forked it
print(json.dumps({"server": server}), flush=True)
sys.stdin.read()  # lives (and leases the server) until the test closes its stdin
"""


def test_jobs_share_the_hosts_server_until_the_last_one_leaves(tmp_path):
    """The first job that needs a server starts it; the next forks its stages from it, also
    after the first has gone; once the last has gone the server has too, and the next job
    starts another."""
    import json
    import subprocess
    import sys
    import time

    env = {**os.environ, "PYTHON_STAGE_SERVER_TEST": str(tmp_path)}  # not the suite's server

    def job():
        return subprocess.Popen([sys.executable, "-c", JOB], env=env, cwd=ROOT, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    first = job()
    owner = json.loads(first.stdout.readline())["server"]
    second = job()
    assert json.loads(second.stdout.readline())["server"] == owner
    first.communicate("")
    third = job()
    assert json.loads(third.stdout.readline())["server"] == owner  # second still leases it
    second.communicate("")
    third.communicate("")
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{owner}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{owner}"), "the server outlived its last lease"
    fourth = job()
    assert json.loads(fourth.stdout.readline())["server"] != owner
    fourth.communicate("")


def test_a_sweeps_process_keeps_the_server_its_forked_jobs_leased_until_it_ends(monkeypatch, tmp_path):
    """hydra/launcher=local forks each job from the sweep's process: with JobLeases (its Hydra
    callback) the server stays when the only running job ends, for the next jobs, and leaves
    when the sweep's process lets go."""
    import time

    from pipelines import isolation

    _fresh_server(monkeypatch, tmp_path)
    monkeypatch.setattr(isolation, "_relay", None)
    isolation.JobLeases().on_multirun_start(config=None)
    pid = os.fork()
    if pid == 0:  # a job: it leases the server, and ends
        code = 1
        try:
            isolation.start()
            (tmp_path / "server").write_text(str(isolation.call("probe", os.getppid)[0]))
            code = 0
        finally:
            os._exit(code)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    server = int((tmp_path / "server").read_text())
    time.sleep(2)
    assert os.path.exists(f"/proc/{server}"), "the server left with the sweep's only job"
    for end in isolation._relay:  # the sweep's process ends
        end.close()
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{server}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{server}"), "the server outlived the sweep"


@pytest.mark.parametrize("threads", [1, 2])
def test_a_stage_computes_on_the_threads_its_job_may_use(monkeypatch, tmp_path, threads):
    """A sweep job's OMP_NUM_THREADS (its share of the cores, hydra_plugins/local_launcher) is
    what torch computes on in its stage processes: a variable read when libraries load, so the
    server the job leases is one started with it."""
    import torch

    from pipelines import isolation

    _fresh_server(monkeypatch, tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", str(threads))
    assert isolation.call("probe", torch.get_num_threads)[0] == threads
