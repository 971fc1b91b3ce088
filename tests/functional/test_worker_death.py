"""A worker process killed mid-run (SIGKILL, what the OOM killer does) stops the run by name, and a restart resumes.

The vLLM engine and the math environment are killed on the second node of a
two-node cluster in ``test_multinode_ray.py``, with these helpers.

Each run is the user's command (``examples/run_*.py``). The role's processes
are found from the run's own log line (``<role>s: rank 0 on node ... (pid N)``)
and one is killed once the first checkpoint exists, while steps keep running.
Then: the command exits with status 1 within 60 s and one line naming the
role, rank, node and pid; the newest checkpoint is complete; the same command
resumes from it and finishes, its metrics log continuing without a gap.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from nemo_rl.utils.logger import read_metrics

pytestmark = [pytest.mark.functional, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SEAT = re.compile(r"rank (\d+) on node (.+?) \(pid (\d+)\)")


def command_line(script: str, section: str, run_dir: Path, max_steps: int) -> list[str]:
    """``examples/<script>.py`` writing into ``run_dir``, a checkpoint every step, no validation."""
    return [
        sys.executable,
        str(ROOT / "examples" / f"{script}.py"),
        f"logger.log_dir={run_dir / 'logs'}",
        f"checkpointing.checkpoint_dir={run_dir / 'ckpt'}",
        "checkpointing.save_period=1",
        "logger.tensorboard_enabled=false",
        f"{section}.val_period=0",
        f"{section}.max_num_steps={max_steps}",
    ]


def _start(command: list[str], out: Path, cache: Path, ray_address: str | None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"NRL_MEGATRON_CHECKPOINT_DIR": str(cache)}
    with out.open("ab") as log:
        return subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env | ({"RAY_ADDRESS": ray_address} if ray_address else {}),
        )


def steps(run_dir: Path) -> list[int]:
    return [row["step"] for row in read_metrics(run_dir / "logs", "train")]


def checkpoints(run_dir: Path) -> list[int]:
    ckpt = run_dir / "ckpt"
    return sorted(int(p.name.split("_")[1]) for p in ckpt.glob("step_*")) if ckpt.is_dir() else []


def seats(text: str, role: str) -> dict[int, tuple[str, int]]:
    """``{rank: (node, pid)}`` from the run's log line listing ``role``'s processes (empty before it is logged)."""
    line = re.search(rf"{role}s: (.*)", text)
    return {int(r): (node, int(pid)) for r, node, pid in SEAT.findall(line.group(1))} if line else {}


def kill_mid_run(
    command: list[str],
    run_dir: Path,
    role: str,
    rank: int,
    cache: Path,
    ready: Callable[[], bool] | None = None,
    ray_address: str | None = None,
) -> tuple[str, int]:
    """Start ``command``; once ``role`` is up and ``ready()`` (by default: a checkpoint exists), SIGKILL its rank
    ``rank``; (the command's output, the pid killed). The command must stop with status 1 within 60 s."""
    out = run_dir.parent / f"{run_dir.name}.{role.replace(' ', '_')}.out"
    process = _start(command, out, cache, ray_address)
    ready = ready or (lambda: bool(checkpoints(run_dir)))
    deadline = time.monotonic() + 600
    try:
        while not ((found := seats(out.read_text(), role)) and ready()):
            assert process.poll() is None, out.read_text()[-4000:]
            assert time.monotonic() < deadline, out.read_text()[-4000:]
            time.sleep(0.5)
        pid = found[rank][1]
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        status = process.wait(timeout=120)
        assert time.monotonic() - killed_at < 60, "the run must stop within 60 s of the death"
    finally:
        if process.poll() is None:
            process.kill()
    text = out.read_text()
    assert status == 1, text[-4000:]
    return text, pid


def assert_named(text: str, role: str, rank: int, pid: int, node: str = ".+") -> None:
    lines = [line for line in text.splitlines() if line.startswith("Run stopped: ")]
    assert len(lines) == 1, text[-4000:]
    pattern = rf"Run stopped: {role} rank {rank} on node {node} \(id [0-9a-f]{{8}}\) \(pid {pid}\) died \("
    assert re.match(pattern, lines[0]), lines[0]


def resume_to_the_end(command: list[str], run_dir: Path, cache: Path) -> list[int]:
    """The same command again (with its step budget): it resumes from the newest checkpoint and finishes."""
    newest = checkpoints(run_dir)[-1]
    out = run_dir.parent / f"{run_dir.name}.resumed.out"
    process = _start(command, out, cache, None)
    assert process.wait(timeout=900) == 0, out.read_text()[-4000:]
    assert f"step_{newest}" in out.read_text()
    return steps(run_dir)


def test_a_killed_policy_worker_is_named_and_the_run_resumes(tmp_path):
    run_dir, cache = tmp_path / "sft", tmp_path / "mcore"
    command = command_line("run_sft", "sft", run_dir, max_steps=40) + [
        "--config",
        str(ROOT / "examples" / "configs" / "sft.yaml"),
        "cluster.gpus_per_node=2",
        "sft.export_hf_dir=null",
    ]
    text, pid = kill_mid_run(command, run_dir, "policy worker", 1, cache)
    assert_named(text, "policy worker", 1, pid)
    newest = checkpoints(run_dir)[-1]
    assert newest < 40
    logged = resume_to_the_end([*command, f"sft.max_num_steps={newest + 2}"], run_dir, cache)
    assert logged == list(range(1, newest + 3))
