"""A real Slurm cluster on this host for tests: tools/slurm/local_cluster.sh, driven from Python.

``ensure_slurm()`` installs Debian's slurm-wlm when ``slurmctld`` is missing and skips only when apt cannot get
it; ``LocalSlurm`` starts the daemons in a state directory, submits batch jobs and waits for them through
``scontrol`` (no accounting database, so no ``sacct``).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOCAL_CLUSTER = REPO / "tools" / "slurm" / "local_cluster.sh"
RAY_SUB = REPO / "tools" / "slurm" / "ray.sub"

# Job states after which a job runs no more (squeue/scontrol names).
FINAL_STATES = {
    "BOOT_FAIL",
    "CANCELLED",
    "COMPLETED",
    "DEADLINE",
    "FAILED",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "TIMEOUT",
}


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def ensure_slurm() -> None:
    """Installs slurm-wlm with apt when ``slurmctld`` is missing; skips only when apt cannot reach its registry."""
    if shutil.which("slurmctld"):
        return
    if shutil.which("apt-get") is None:
        pytest.skip("slurmctld is missing and there is no apt-get to install slurm-wlm with")
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    if sudo and shutil.which("sudo") is None:
        pytest.skip("slurmctld is missing; installing slurm-wlm needs root (or sudo)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}

    def apt(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*sudo, "apt-get", *args], env=env, capture_output=True, text=True, timeout=900)

    install = apt("install", "-y", "slurm-wlm")
    if install.returncode != 0:  # most often: no package lists yet
        update = apt("update")
        install = apt("install", "-y", "slurm-wlm")
        if install.returncode != 0:
            reason = _tail(update.stdout + update.stderr + install.stdout + install.stderr)
            print(f"apt-get install -y slurm-wlm failed:\n{reason}")
            if update.returncode != 0:
                pytest.skip(f"slurmctld is missing and apt cannot reach its registry: {reason}")
            raise RuntimeError(f"apt-get install -y slurm-wlm failed:\n{reason}")
    if shutil.which("slurmctld") is None:
        raise RuntimeError("apt-get installed slurm-wlm but slurmctld is not on PATH")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def free_ports(count: int, low: int = 20000, high: int = 40000) -> int:
    """The first of ``count`` consecutive free TCP ports (slurmctld's, then one per slurmd)."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(low, high - count)
        if all(_port_free(base + i) for i in range(count)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports in [{low}, {high})")


def job_fields(text: str) -> dict[str, str]:
    """``scontrol show job -o`` as a dict (values up to the next space)."""
    return dict(re.findall(r"(\w+)=(\S*)", text))


@dataclass
class LocalSlurm:
    """tools/slurm/local_cluster.sh's cluster in ``state_dir``: ``nodes`` Slurm nodes n1..nN on this host."""

    state_dir: Path
    nodes: int = 2
    port: int = 0  # slurmctld's; node i's slurmd listens on port + i. 0: free ones

    def __post_init__(self) -> None:
        if not self.port:
            self.port = free_ports(self.nodes + 1)

    @property
    def env(self) -> dict[str, str]:
        """What a Slurm client (sbatch, srun, sinfo) needs to reach this cluster."""
        return {"SLURM_CONF": str(self.state_dir / "slurm.conf")}

    def _script(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        env = {**os.environ, "LOCAL_SLURM_PORT": str(self.port), "LOCAL_SLURM_NODES": str(self.nodes)}
        return subprocess.run(
            ["bash", str(LOCAL_CLUSTER), *args, str(self.state_dir)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self) -> None:
        proc = self._script("start")
        if proc.returncode != 0:
            self.stop()
            raise RuntimeError(f"local_cluster.sh start failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")

    def stop(self) -> None:
        self._script("stop")

    def status(self) -> subprocess.CompletedProcess:
        return self._script("status")

    def client(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            list(cmd), env={**os.environ, **self.env}, capture_output=True, text=True, timeout=timeout
        )

    def show_job(self, job_id: str) -> dict[str, str]:
        proc = self.client("scontrol", "show", "job", "-o", job_id)
        assert proc.returncode == 0, proc.stderr
        return job_fields(proc.stdout)

    def submit(self, env: dict[str, str], *sbatch_args: str, cwd: Path = REPO) -> str:
        """``sbatch --parsable [args]``; returns the job id."""
        proc = subprocess.run(
            ["sbatch", "--parsable", *sbatch_args],
            env={**env, **self.env},
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout.strip().split(";")[0]

    def wait(self, job_id: str, timeout: float) -> dict[str, str]:
        """Polls ``scontrol show job`` until the job has ended; cancels it (and fails) after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.show_job(job_id)
            if job.get("JobState") in FINAL_STATES:
                return job
            if time.monotonic() > deadline:
                self.client("scancel", job_id)
                pytest.fail(f"Slurm job {job_id} still {job.get('JobState')} after {timeout:.0f}s")
            time.sleep(0.5)
