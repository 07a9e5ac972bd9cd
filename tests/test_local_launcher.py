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
