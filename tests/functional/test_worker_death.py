"""A worker process killed mid-run (SIGKILL, what the OOM killer does) stops the run by name, and a restart resumes.

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
from pathlib import Path

import pytest

from nemo_rl.utils.logger import read_metrics

pytestmark = [pytest.mark.functional, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SEAT = re.compile(r"rank (\d+) on node (.+?) \(pid (\d+)\)")


def _command(script: str, section: str, run_dir: Path, steps: int) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "examples" / f"{script}.py"),
        f"logger.log_dir={run_dir / 'logs'}",
        f"checkpointing.checkpoint_dir={run_dir / 'ckpt'}",
        "checkpointing.save_period=1",
        "logger.tensorboard_enabled=false",
        f"{section}.val_period=0",
        f"{section}.max_num_steps={steps}",
    ]


def _start(command: list[str], out: Path, cache: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"NRL_MEGATRON_CHECKPOINT_DIR": str(cache)}
    with out.open("ab") as log:
        return subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)


def _steps(run_dir: Path) -> list[int]:
    return [row["step"] for row in read_metrics(run_dir / "logs", "train")]


def _checkpoints(run_dir: Path) -> list[int]:
    ckpt = run_dir / "ckpt"
    return sorted(int(p.name.split("_")[1]) for p in ckpt.glob("step_*")) if ckpt.is_dir() else []


def kill_mid_run(command: list[str], run_dir: Path, role: str, rank: int, cache: Path) -> tuple[str, int]:
    """Start ``command``, SIGKILL ``role``'s rank ``rank`` once a checkpoint exists; (its output, the pid killed)."""
    out = run_dir.parent / f"{run_dir.name}.{role.replace(' ', '_')}.out"
    process = _start(command, out, cache)
    deadline = time.monotonic() + 600
    try:
        while not (_checkpoints(run_dir) and (seats := re.search(rf"{role}s: (.*)", out.read_text()))):
            assert process.poll() is None, out.read_text()[-4000:]
            assert time.monotonic() < deadline, out.read_text()[-4000:]
            time.sleep(0.5)
        pids = {int(r): int(pid) for r, _, pid in SEAT.findall(seats.group(1))}
        os.kill(pids[rank], signal.SIGKILL)
        killed_at = time.monotonic()
        status = process.wait(timeout=120)
        assert time.monotonic() - killed_at < 60, "the run must stop within 60 s of the death"
    finally:
        if process.poll() is None:
            process.kill()
    text = out.read_text()
    assert status == 1, text[-4000:]
    return text, pids[rank]


def assert_named(text: str, role: str, rank: int, pid: int) -> None:
    lines = [line for line in text.splitlines() if line.startswith("Run stopped: ")]
    assert len(lines) == 1, text[-4000:]
    assert re.match(rf"Run stopped: {role} rank {rank} on node .+ \(id [0-9a-f]{{8}}\) \(pid {pid}\) died \(", lines[0])


def resume_to_the_end(command: list[str], run_dir: Path, cache: Path) -> list[int]:
    """The same command again (with its step budget): it resumes from the newest checkpoint and finishes."""
    newest = _checkpoints(run_dir)[-1]
    out = run_dir.parent / f"{run_dir.name}.resumed.out"
    process = _start(command, out, cache)
    assert process.wait(timeout=900) == 0, out.read_text()[-4000:]
    assert f"step_{newest}" in out.read_text()
    return _steps(run_dir)


def test_a_killed_policy_worker_is_named_and_the_run_resumes(tmp_path):
    run_dir, cache = tmp_path / "sft", tmp_path / "mcore"
    command = _command("run_sft", "sft", run_dir, steps=40) + [
        "--config",
        str(ROOT / "examples" / "configs" / "sft.yaml"),
        "cluster.gpus_per_node=2",
        "sft.export_hf_dir=null",
    ]
    text, pid = kill_mid_run(command, run_dir, "policy worker", 1, cache)
    assert_named(text, "policy worker", 1, pid)
    newest = _checkpoints(run_dir)[-1]
    assert newest < 40
    steps = resume_to_the_end([*command, f"sft.max_num_steps={newest + 2}"], run_dir, cache)
    assert steps == list(range(1, newest + 3))


def test_a_killed_engine_or_environment_is_named_and_the_run_resumes(tmp_path):
    run_dir, cache = tmp_path / "grpo", tmp_path / "mcore"
    command = _command("run_grpo_math", "grpo", run_dir, steps=40)
    text, pid = kill_mid_run(command, run_dir, "vLLM engine", 0, cache)
    assert_named(text, "vLLM engine", 0, pid)
    text, pid = kill_mid_run(command, run_dir, "math environment", 0, cache)
    assert_named(text, "math environment", 0, pid)
    newest = _checkpoints(run_dir)[-1]
    steps = resume_to_the_end([*command, f"grpo.max_num_steps={newest + 1}"], run_dir, cache)
    assert steps == list(range(1, newest + 2))
