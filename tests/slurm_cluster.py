"""A real one-node Slurm on localhost for the cluster tests: Debian's slurm-wlm and munge
(installed here by apt when missing, 7-15 s), munged, slurmctld and slurmd started by hand from a
temporary slurm.conf (no systemd), stopped afterwards. Facts and traps: ../shared/FIELD-NOTES.md.

Memory limits are enforced (jobacct_gather/linux with OverMemoryKill: a job over its --mem is
killed within a second). There is no slurmdbd, so `sacct` is answered from `squeue -t all`
(finished jobs stay listed for MinJobAge): submitit asks sacct whether a job that left no result
died, and without an answer it would wait forever.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

from tests.conftest import unavailable

PACKAGES = ("slurm-wlm", "munge")
SACCT = """#!/bin/sh
# submitit asks: sacct -o JobID,State,NodeList --parsable2 -j ID [-j ID...]
ids=""
while [ $# -gt 0 ]; do
  case "$1" in -j) ids="$ids,$2"; shift 2 ;; *) shift ;; esac
done
echo "JobID|State|NodeList"
exec squeue -h -t all -o '%i|%T|%N' -j "${ids#,}"
"""


def install() -> None:
    """slurm-wlm and munge from Debian's packages, unless already there."""
    if all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "munged", "sbatch")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        unavailable("Slurm is not installed and this user cannot apt-get install slurm-wlm munge")
    done = subprocess.run(["apt-get", "install", "-y", "-q", *PACKAGES], capture_output=True, text=True,
                          env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if done.returncode != 0:
        unavailable(f"apt-get install {' '.join(PACKAGES)} failed: {done.stderr[-500:]}")


def _conf(root: Path, memory_mb: int) -> str:
    return f"""ClusterName=pipeline-test
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=256
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherParams=OverMemoryKill
JobAcctGatherFrequency=task=1
KillWait=5
MinJobAge=300
ReturnToService=2
MpiDefault=none
NodeName=localhost CPUs={os.cpu_count()} RealMemory={memory_mb} State=UNKNOWN
PartitionName=test Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


@contextlib.contextmanager
def one_node_cluster(root: Path, memory_mb: int = 6000) -> Iterator[dict[str, str]]:
    """Start munged, slurmctld and slurmd under root; yield the environment that reaches them
    (SLURM_CONF, and PATH with the sacct above first); stop all three at the end."""
    install()
    (root / "munge").mkdir(parents=True)
    (root / "munge").chmod(0o755)
    for name in ("state", "spool", "bin"):
        (root / name).mkdir()
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    (root / "slurm.conf").write_text(_conf(root, memory_mb))
    sacct = root / "bin" / "sacct"
    sacct.write_text(SACCT)
    sacct.chmod(0o755)
    env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf"), "PATH": f"{root / 'bin'}:{os.environ['PATH']}"}
    subprocess.run(["munged", "-f", f"--socket={root}/munge/munge.socket", f"--key-file={key}",
                    f"--log-file={root}/munged.log", f"--pid-file={root}/munged.pid",
                    f"--seed-file={root}/munged.seed"], check=True, env=env)
    daemons = [subprocess.Popen(command, env=env, stdout=open(root / f"{command[0]}.out", "w"),
                                stderr=subprocess.STDOUT, start_new_session=True)
               for command in (["slurmctld", "-D", "-i"], ["slurmd", "-D", "-N", "localhost"])]
    try:
        _wait_idle(env, root)
        yield env
    finally:
        for daemon in reversed(daemons):  # slurmd ignores SIGTERM while it retries registering
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(3)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        subprocess.run(["munged", "-s", f"--socket={root}/munge/munge.socket"], env=env, capture_output=True)


def _wait_idle(env: dict[str, str], root: Path, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout
        if state.strip() == "idle":
            return
        time.sleep(0.3)
    logs = "\n".join((root / name).read_text()[-1500:] for name in ("slurmctld.log", "slurmd.log")
                     if (root / name).exists())
    raise RuntimeError(f"the test cluster's node did not come up idle on {socket.gethostname()}:\n{logs}")


def jobs(env: dict[str, str]) -> dict[str, str]:
    """Every job the cluster has seen: id -> state."""
    listed = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i|%T"], env=env, capture_output=True,
                            text=True, check=True).stdout
    return dict(line.split("|") for line in listed.split())
