"""A training run killed with SIGKILL mid-step and started again reaches the uninterrupted loss curve.

The run is the user's command (``examples/run_sft.py`` in its own process
group, Ray included); SIGKILL to the whole group is what a node failure or an
out-of-memory kill does: no cleanup, no final checkpoint. Restarting the same
command resumes from the newest complete checkpoint, repeats the steps logged
after it (the metrics log is rewound so none appears twice) and must then
follow the uninterrupted run step by step.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nemo_rl.utils.logger import read_metrics

pytestmark = [pytest.mark.functional, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
STEPS = 8


def _command(run_dir: Path) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "examples" / "run_sft.py"),
        f"logger.log_dir={run_dir / 'logs'}",
        f"checkpointing.checkpoint_dir={run_dir / 'ckpt'}",
        "checkpointing.save_period=2",
        "sft.export_hf_dir=null",
        "sft.val_period=0",
        "logger.tensorboard_enabled=false",
        f"sft.max_num_steps={STEPS}",
    ]


def _start(run_dir: Path) -> subprocess.Popen:
    log = open(run_dir.parent / f"{run_dir.name}.out", "ab")
    return subprocess.Popen(_command(run_dir), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _train_steps(run_dir: Path) -> list[int]:
    return [row["step"] for row in read_metrics(run_dir / "logs", "train")]


def _wait(process: subprocess.Popen, run_dir: Path) -> None:
    assert process.wait(timeout=900) == 0, (run_dir.parent / f"{run_dir.name}.out").read_text()[-4000:]


def test_sigkill_mid_training_then_restart_matches_an_uninterrupted_run(tmp_path):
    straight = tmp_path / "straight"
    straight.mkdir()
    _wait(_start(straight), straight)

    killed = tmp_path / "killed"
    killed.mkdir()
    process = _start(killed)
    deadline = time.monotonic() + 900
    while not any(step >= 5 for step in _train_steps(killed)):  # step_4 is committed, step 5 is logged
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    logged_before_kill = _train_steps(killed)
    checkpoints = sorted(p.name for p in (killed / "ckpt").iterdir() if p.name.startswith("step_"))
    assert "step_4" in checkpoints and f"step_{STEPS}" not in checkpoints

    _wait(_start(killed), killed)
    steps = _train_steps(killed)
    assert steps == list(range(1, STEPS + 1)), f"logged before the kill: {logged_before_kill}, after resume: {steps}"
    losses = {row["step"]: row["loss"] for row in read_metrics(killed / "logs", "train")}
    reference = {row["step"]: row["loss"] for row in read_metrics(straight / "logs", "train")}
    torch.testing.assert_close(
        torch.tensor([losses[s] for s in steps]), torch.tensor([reference[s] for s in steps]), rtol=1e-5, atol=1e-5
    )
