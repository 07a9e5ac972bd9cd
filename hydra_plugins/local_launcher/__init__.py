"""hydra/launcher=local: a sweep's jobs in parallel on this machine, each in a process forked
from the sweep's own.

Hydra's joblib launcher (used here before) spawns its workers with loky: each is a new
interpreter that imports Hydra and the project again, and each job carries Hydra's pickled
singleton state (its whole ConfigStore); a warm sweep spent most of its time so. The sweep's
process has all of that loaded and never imports torch (stages run in the stage server's
processes, pipelines/isolation.py), so a fork of it starts a job with everything in place. A
process per job: no job inherits another's logging or Hydra state. A job whose process dies
(a native crash, the kernel's OOM killer) is a failed cell of the sweep's matrix, named with
its signal, and the sweep goes on to its other jobs. Each job computes on its share of the
cores, `OMP_NUM_THREADS` = cores // n_jobs (torch's threads, and onnxruntime's in
stages/formats/onnx_session.py), unless that is set: two jobs of two threads each on two cores
spin-wait on each other's (a demo sweep: 14.1 -> 12.9 s). (No `from __future__ import annotations`:
Hydra's plugin scan runs this module outside sys.modules, where a dataclass cannot resolve it.)
"""

import contextlib
import logging
import os
import pickle
import signal
import sys
import tempfile
import traceback
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


@dataclass
class LocalLauncherConf:
    _target_: str = "hydra_plugins.local_launcher.LocalLauncher"
    n_jobs: int = 1  # jobs at once


ConfigStore.instance().store(group="hydra/launcher", name="forked", node=LocalLauncherConf, provider="pipeline")


class LocalLauncher(Launcher):
    def __init__(self, n_jobs: int = 1) -> None:
        super().__init__()
        self.n_jobs = max(1, int(n_jobs))
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info("Launching %d jobs, %d at once, sweep output dir: %s", len(job_overrides), self.n_jobs,
                 self.config.hydra.sweep.dir)
        pending = deque(enumerate(job_overrides, initial_job_idx))
        running: dict[int, tuple[int, str]] = {}  # pid -> (job index, its result file)
        results: dict[int, JobReturn] = {}
        try:
            while pending or running:
                while pending and len(running) < self.n_jobs:
                    index, overrides = pending.popleft()
                    log.info("\t#%d : %s", index, " ".join(filter_overrides(overrides)))
                    running.update(self._fork(index, list(overrides)))
                pid, status = os.wait()
                if pid in running:
                    index, path = running.pop(pid)
                    results[index] = _result(path, status, index, self.config)
        except BaseException:  # Ctrl-C or an error here: no job may outlive the sweep
            for pid in running:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGTERM)
            for pid, (_, path) in running.items():
                with contextlib.suppress(OSError):
                    os.waitpid(pid, 0)
                with contextlib.suppress(OSError):
                    os.unlink(path)
            raise
        return [results[index] for index in sorted(results)]

    def _fork(self, index: int, overrides: list[str]) -> dict[int, tuple[int, str]]:
        handle, path = tempfile.mkstemp(prefix=f".job-{index}-", suffix=".pickle", dir=str(self.config.hydra.sweep.dir))
        os.close(handle)
        pid = os.fork()
        if pid == 0:
            from pipelines.memory import threads_per_job

            os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_job(self.n_jobs)))
            code = 0
            try:
                value = self._run(index, overrides)
            except BaseException as exc:  # run_job keeps the task's own errors; this is Hydra's
                traceback.print_exc()
                value, code = exc, 1
            try:
                with open(path, "wb") as out:
                    pickle.dump(value, out)
            except Exception:
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                logging.shutdown()
                os._exit(code)
        return {pid: (index, path)}

    def _run(self, index: int, overrides: list[str]) -> JobReturn:
        """The job, as Hydra's launchers run one (hydra_joblib_launcher._core.execute_job)."""
        config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(config):
            config.hydra.job.id = f"{config.hydra.job.name}_{index}"
            config.hydra.job.num = index
        HydraConfig.instance().set_config(config)
        return run_job(hydra_context=self.hydra_context, config=config, task_function=self.task_function,
                       job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")


def _result(path: str, status: int, index: int, config: DictConfig) -> JobReturn:
    """The job's return, or for a job whose process died, a failed cell that says how."""
    try:
        with open(path, "rb") as handle:
            value = pickle.load(handle)
    except (OSError, EOFError, pickle.UnpicklingError):
        value = None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    if isinstance(value, JobReturn):
        return value
    code = os.waitstatus_to_exitcode(status)
    how = (f"was killed by {signal.Signals(-code).name}" if code < 0 else f"ended with exit code {code}")
    why = f"sweep job #{index}'s process {how} before it returned"
    if isinstance(value, BaseException):
        why += f": {value!r}"
    log.error("%s: its cell fails (its log is in %s)", why, config.hydra.sweep.dir)
    failed = JobReturn()
    failed.status = JobStatus.COMPLETED
    failed.return_value = {"status": "fail", "error": why, "parts": []}
    return failed
