"""hydra/launcher=local (hydra_plugins/local_launcher): each sweep job in a process forked from
the sweep's; a job whose process dies is a failed cell and the others still run."""
import os
import signal

from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from hydra_plugins.local_launcher import LocalLauncher


def test_jobs_run_in_forked_processes_in_order_and_a_dead_one_is_a_failed_cell(monkeypatch, tmp_path):
    def run(self, index, overrides):  # the forked job: what Hydra's run_job would return
        if overrides == ["cell=dies"]:
            os.kill(os.getpid(), signal.SIGKILL)
        done = JobReturn()
        done.status = JobStatus.COMPLETED
        done.return_value = {"status": "pass", "cell": overrides[0], "pid": os.getpid()}
        return done

    monkeypatch.setattr(LocalLauncher, "_run", run)
    launcher = LocalLauncher(n_jobs=2)
    launcher.setup(hydra_context=None, task_function=None,
                   config=OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}, "hydra_logging": None,
                                                      "verbose": False}}))
    results = launcher.launch([["cell=a"], ["cell=dies"], ["cell=b"], ["cell=c"]], initial_job_idx=0)
    values = [r.return_value for r in results]
    assert [v.get("cell") for v in values] == ["cell=a", None, "cell=b", "cell=c"]
    assert values[1]["status"] == "fail" and "SIGKILL" in values[1]["error"]
    assert len({v["pid"] for v in values if "pid" in v} | {os.getpid()}) == 4  # a process of its own each
    assert not list(tmp_path.glob(".job-*"))  # no result file left behind


def test_each_job_computes_on_its_share_of_the_cores_unless_the_user_set_it(monkeypatch, tmp_path):
    """Two jobs at once on this machine's cores: each gets cores // 2 threads (OMP_NUM_THREADS,
    which the stage server and onnxruntime's sessions follow); a value the user set stays."""
    from pipelines.memory import threads_per_job, usable_cores

    def run(self, index, overrides):
        done = JobReturn()
        done.status = JobStatus.COMPLETED
        done.return_value = {"threads": os.environ.get("OMP_NUM_THREADS")}
        return done

    monkeypatch.setattr(LocalLauncher, "_run", run)
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}, "hydra_logging": None, "verbose": False}})
    launcher = LocalLauncher(n_jobs=2)
    launcher.setup(hydra_context=None, task_function=None, config=config)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = usable_cores()
    assert threads_per_job(2) == max(1, cores // 2) and threads_per_job(cores * 4) == 1
    assert [r.return_value["threads"] for r in launcher.launch([["a=1"], ["a=2"]], 0)] == [str(max(1, cores // 2))] * 2
    assert "OMP_NUM_THREADS" not in os.environ  # the sweep's own process is left as it was
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert [r.return_value["threads"] for r in launcher.launch([["a=1"]], 0)] == ["3"]


def test_onnxruntime_sessions_follow_the_jobs_share_unless_given_threads(monkeypatch, tmp_path):
    import torch

    from stages.formats.onnx_session import session

    path = tmp_path / "m.onnx"
    torch.onnx.export(torch.nn.Linear(3, 2).eval(), (torch.randn(1, 3),), str(path), dynamo=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert session(path).get_session_options().intra_op_num_threads == 1
    assert session(path, threads=2).get_session_options().intra_op_num_threads == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert session(path).get_session_options().intra_op_num_threads == 0  # onnxruntime's default
