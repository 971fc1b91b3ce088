"""tools/slurm/ray.sub under a real Slurm on this host: slurmctld, three slurmd nodes and munged from
tools/slurm/local_cluster.sh, real Ray nodes (`ray start --block` steps), the SFT recipe as the command.

Nothing is stubbed. Every job runs with its own Ray port and temp dir (other Ray clusters may share the host),
and must leave no process behind: ray.sub stops only its own Ray nodes. The SFT job runs on n1 and n2; then the
two failing jobs run at once, one on n1 and one on n2 + n3 (the host has 2 cores: the module takes ~3-4 min).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from nemo_rl.utils.logger import read_metrics
from tests.slurm_cluster import RAY_SUB, REPO, LocalSlurm, ensure_slurm, free_ports

pytestmark = [pytest.mark.functional, pytest.mark.slow, pytest.mark.multinode]

SFT_STEPS = 2


@pytest.fixture(scope="module")
def short_tmp():
    """A short temp dir: Ray's and munge's unix sockets live under it (108-byte limit on their paths)."""
    path = Path(tempfile.mkdtemp(prefix="nrl-slurm-"))
    path.chmod(0o755)  # munged wants every directory above its socket searchable by all
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def slurm(short_tmp):
    """Three Slurm nodes (n1, n2, n3) on this host, stopped after the module."""
    ensure_slurm()
    cluster = LocalSlurm(short_tmp / "slurm", nodes=3)
    cluster.start()
    try:
        status = cluster.status()
        assert status.returncode == 0, status.stdout + status.stderr
        assert re.findall(r"^(n\d) idle", status.stdout, re.M) == ["n1", "n2", "n3"], status.stdout
        yield cluster
    finally:
        cluster.stop()
        assert cluster.status().returncode != 0, "local_cluster.sh stop left a daemon running"


def _ray_sub_env(tmp: Path, ray_tmp: Path, **extra: str) -> dict[str, str]:
    """The submitting shell's environment: the venv's ``ray`` on PATH, no GPUs, small timeouts, own Ray ports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RAY_"))}
    for name in ("COMMAND", "CONTAINER", "MOUNTS", "SETUP_COMMAND", "CPUS_PER_WORKER", "DRY_RUN", "BASE_LOG_DIR"):
        env.pop(name, None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    ray_port, client_port = free_ports(1), free_ports(1)
    env.update(
        GPUS_PER_NODE="0",
        RAY_PORT=str(ray_port),
        RAY_POLL_INTERVAL="1",
        RAY_STARTUP_TIMEOUT="300",
        BASE_LOG_DIR=str(tmp / "ray-logs"),
        RAY_START_ARGS=f"--temp-dir={ray_tmp} --disable-usage-stats",
        RAY_HEAD_START_ARGS=f"--include-dashboard=false --ray-client-server-port={client_port}",
    )
    env.update(extra)
    return env


def _job_processes(slurm: LocalSlurm, job_id: str, ray_tmp: Path) -> list[str]:
    """Live processes of this job (by SLURM_JOB_ID and SLURM_CONF in their environment) or of its Ray nodes."""
    marks = (f"SLURM_JOB_ID={job_id}".encode(), f"SLURM_CONF={slurm.env['SLURM_CONF']}".encode())
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = set((proc / "environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if all(m in environ for m in marks) or str(ray_tmp).encode() in cmdline:
            args = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{proc.name}: {args[:200]}")
    return found


def _assert_nothing_left(slurm: LocalSlurm, job_id: str, ray_tmp: Path) -> None:
    deadline = time.monotonic() + 20
    while (left := _job_processes(slurm, job_id, ray_tmp)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"job {job_id} left processes behind:\n" + "\n".join(left)


@pytest.fixture
def ray_tmp(short_tmp):
    """The job's Ray temp dir (``ray start --temp-dir``): its sessions, sockets and address file."""
    return Path(tempfile.mkdtemp(prefix="ray-", dir=short_tmp))


def test_sft_on_two_slurm_nodes(slurm, tmp_path, ray_tmp):
    run = tmp_path / "run"
    command = " ".join(
        [
            "python examples/run_sft.py --config examples/configs/sft.yaml",
            f"sft.max_num_steps={SFT_STEPS}",
            f"logger.log_dir={run / 'logs'}",
            f"checkpointing.checkpoint_dir={run / 'ckpt'}",
            # one Megatron worker per Slurm node (data parallel over gloo, across the two Ray nodes)
            "cluster.num_nodes=2",
            "sft.val_period=0",
            "sft.export_hf_dir=null",
            "long_context_eval.enabled=false",
            "logger.tensorboard_enabled=false",
        ]
    )
    env = _ray_sub_env(tmp_path, ray_tmp, COMMAND=command)
    started = time.monotonic()
    job_id = slurm.submit(env, f"--output={tmp_path}/slurm-%j.out", "--nodelist=n1,n2", str(RAY_SUB))
    job = slurm.wait(job_id, timeout=600)
    out = (tmp_path / f"slurm-{job_id}.out").read_text()
    print(f"SFT job {job_id}: {job['JobState']} in {time.monotonic() - started:.0f}s")
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), out
    assert job["NodeList"] == "n[1-2]"

    logs = tmp_path / "ray-logs" / job_id
    assert sorted(p.name for p in logs.iterdir()) == ["command.log", "ray-head.log", "ray-worker-n2.log"]
    for name in ("ray-head.log", "ray-worker-n2.log"):
        assert "Ray runtime started" in (logs / name).read_text(), name
    assert "Ray cluster: 1/2 node(s) up" in out and "Ray cluster: 2/2 node(s) up" in out
    assert "COMMAND exited with status 0" in out
    assert f"SFT finished at step {SFT_STEPS}" in (logs / "command.log").read_text()

    rows = read_metrics(run / "logs", "train")
    assert [row["step"] for row in rows] == [1, 2]
    assert all(math.isfinite(row["loss"]) for row in rows), rows
    assert (run / "ckpt" / f"step_{SFT_STEPS}").is_dir()
    # the Ray nodes were stopped by SIGTERM to their steps, and nothing of the job is left
    assert "Stopping Ray on 2 node(s)" in out and "still running after" not in out  # no SIGKILL fallback
    assert len(re.findall(rf"^\+ scancel --signal=TERM {job_id}\.\d+$", out, re.M)) == 2, out
    _assert_nothing_left(slurm, job_id, ray_tmp)


@dataclass
class FailingJobs:
    """The two failing jobs, submitted together: ``exit3`` (sbatch --wait) on n1, ``never_joins`` on n2 + n3."""

    tmp: Path
    exit3: subprocess.Popen
    never_joins: str
    ray_tmp: dict[str, Path]
    worker_timeout: int


@pytest.fixture(scope="module")
def failing_jobs(slurm, short_tmp, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("failing-jobs")
    ray_tmp = {name: Path(tempfile.mkdtemp(prefix="ray-", dir=short_tmp)) for name in ("exit3", "never_joins")}
    exit3_env = _ray_sub_env(tmp / "exit3", ray_tmp["exit3"], COMMAND="echo about to fail; exit 3")
    exit3 = subprocess.Popen(
        ["sbatch", "--wait", "--nodelist=n1", f"--output={tmp}/slurm-%j.out", str(RAY_SUB)],
        env={**exit3_env, **slurm.env},
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    worker_timeout = 20  # once the head is up (however long that takes on 2 busy cores), n3 gets 20 s to join
    never_joins_env = _ray_sub_env(
        tmp / "never_joins",
        ray_tmp["never_joins"],
        COMMAND=f"touch {tmp / 'should-not-run'}",
        SETUP_COMMAND='if [ "$SLURMD_NODENAME" = n3 ]; then sleep 600; fi',
        RAY_HEAD_STARTUP_TIMEOUT="300",
        RAY_STARTUP_TIMEOUT=str(worker_timeout),
    )
    never_joins = slurm.submit(never_joins_env, f"--output={tmp}/slurm-%j.out", "--nodelist=n2,n3", str(RAY_SUB))
    try:
        yield FailingJobs(tmp, exit3, never_joins, ray_tmp, worker_timeout)
    finally:
        if exit3.poll() is None:
            exit3.kill()
        slurm.client("scancel", never_joins)


def test_failing_command_fails_the_job_with_its_status(slurm, failing_jobs):
    try:
        stdout, _ = failing_jobs.exit3.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("sbatch --wait did not return within 300 s")
    job_id = re.search(r"Submitted batch job (\d+)", stdout).group(1)
    out = (failing_jobs.tmp / f"slurm-{job_id}.out").read_text()
    assert failing_jobs.exit3.returncode == 3, out  # sbatch --wait exits with the job's status
    job = slurm.show_job(job_id)
    assert (job["JobState"], job["ExitCode"], job["NodeList"]) == ("FAILED", "3:0", "n1"), out
    assert "Ray cluster: 1/1 node(s) up" in out and "COMMAND exited with status 3" in out
    assert "Stopping Ray on 1 node(s)" in out and "still running after" not in out
    assert "about to fail\n" in (failing_jobs.tmp / "exit3" / "ray-logs" / job_id / "command.log").read_text()
    _assert_nothing_left(slurm, job_id, failing_jobs.ray_tmp["exit3"])


def test_a_worker_that_never_joins_is_named(slurm, failing_jobs):
    job_id = failing_jobs.never_joins
    job = slurm.wait(job_id, timeout=420)
    out = (failing_jobs.tmp / f"slurm-{job_id}.out").read_text()
    assert (job["JobState"], job["ExitCode"], job["NodeList"]) == ("FAILED", "1:0", "n[2-3]"), out
    assert "Ray cluster: 1/2 node(s) up" in out, out
    message = re.search(r"^error: only .*$", out, re.M)
    assert message, out
    timeout = failing_jobs.worker_timeout
    assert message.group(0).startswith(
        f"error: only 1 of 2 Ray node(s) joined within {timeout}s (RAY_STARTUP_TIMEOUT); not joined: n3;"
    ), message.group(0)
    logs = failing_jobs.tmp / "never_joins" / "ray-logs" / job_id
    assert "Ray runtime started" in (logs / "ray-head.log").read_text()
    assert "Ray runtime started" not in (logs / "ray-worker-n3.log").read_text()
    assert not (logs / "command.log").exists() and not (failing_jobs.tmp / "should-not-run").exists()
    _assert_nothing_left(slurm, job_id, failing_jobs.ray_tmp["never_joins"])  # the hanging setup on n3 included
