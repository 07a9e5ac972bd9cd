"""hydra/launcher=cluster: Hydra's submitit Slurm launcher, where a job that dies (cancelled, over
its memory, its node lost) is a failed cell of the sweep's matrix instead of the end of the sweep.

Upstream (hydra-submitit-launcher 1.2, submitit_launcher.py `launch`) ends with
`[j.results()[0] for j in jobs]`: the first job with no result raises UncompletedJobError, the
sweep exits before its matrix while the other jobs still run, unwatched. Here each dead job is
named on the console (its Slurm state and log) and comes back as a failed result; the matrix
lists its cell as failed ("no report: the job died"), and the sweep exits 1 at its end.
"""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

log = logging.getLogger(__name__)


class ClusterLauncher(SlurmLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        with _dead_jobs_as_failures():
            return super().launch(job_overrides, initial_job_idx)


def _failed(job: Any, what: str) -> JobReturn:
    """A finished job's return for a cell whose Slurm job died: the sweep goes on to its matrix."""
    why = f"Slurm job {job.job_id} {what}"
    log.error("%s: its cell fails (log: %s)", why, job.paths.stderr)
    failed = JobReturn()
    failed.status = JobStatus.COMPLETED
    failed.return_value = {"status": "fail", "error": why, "parts": []}
    return failed


def _final_state(job: Any, wait_s: float = 15.0) -> str:
    """The job's state once Slurm has settled it (a cancelled job shows RUNNING or COMPLETING for
    up to KillWait seconds after it wrote its last words)."""
    deadline = time.monotonic() + wait_s
    while True:
        state = job.get_info(mode="force").get("State") or "UNKNOWN"
        if state not in ("RUNNING", "COMPLETING", "PENDING", "UNKNOWN") or time.monotonic() > deadline:
            return state
        time.sleep(0.5)


def _slurm_says(stderr: Path) -> str:
    """Slurm's own last word in the job's log ("Exceeded job memory limit", "CANCELLED AT ...")."""
    try:
        said = [line.split("error:", 1)[1].strip(" *") for line in stderr.read_text(errors="replace").splitlines()
                if line.startswith("slurmstepd") and "error:" in line]
    except OSError:
        return ""
    return f" ({said[-1]})" if said else ""


@contextlib.contextmanager
def _dead_jobs_as_failures() -> Iterator[None]:
    from submitit.core import core, utils

    results = core.Job.results

    def tolerant(job: core.Job) -> list[Any]:
        try:
            returned = results(job)
        except utils.UncompletedJobError:  # killed before it could write a result
            return [_failed(job, f"ended {_final_state(job)} without a result{_slurm_says(job.paths.stderr)}")]
        # stopped by a signal (scancel sends SIGTERM first), the job wrote its exception
        return [_failed(job, f"ended {_final_state(job)}: {type(r._return_value).__name__}: {r._return_value}")
                if isinstance(r, JobReturn) and r.status == JobStatus.FAILED else r for r in returned]

    core.Job.results = tolerant
    try:
        yield
    finally:
        core.Job.results = results
