"""DPO end to end on CPU: Ray, two data-parallel Megatron workers, YaRN at 8x the tiny model's window.

The ``tiny-preference`` pairs reach past the original 256 tokens, so every
check covers positions only YaRN makes valid. What is checked:

* the first step's loss is log 2 and its margin 0: before any update the policy
  *is* the reference, which the workers score separately (a reference that
  drifted, or one the resume overwrote, would not give this);
* the validation margin and accuracy grow with training;
* a run stopped at step 2 and resumed gives exactly the uninterrupted run's
  steps 3 and 4 (the reference is still the starting model after a resume).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from nemo_rl.utils.logger import read_metrics
from tests.helpers import local_ray

pytestmark = [pytest.mark.functional, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "examples" / "configs" / "recipes" / "llm" / "dpo-tiny-qwen2-1n2cpu-megatron-yarn-8x.yaml"
ORIGINAL_WINDOW = 256


def _dpo(tmp_path: Path, run_dir: Path, *overrides: str):
    from nemo_rl.algorithms.dpo import run_dpo
    from nemo_rl.config.loader import load_config, resolve_config
    from nemo_rl.config.schema import validate_dpo_config

    resolved = resolve_config(
        load_config(
            RECIPE,
            [
                f"logger.log_dir={run_dir / 'logs'}",
                f"checkpointing.checkpoint_dir={run_dir / 'ckpt'}",
                "dpo.export_hf_dir=null",
                "logger.tensorboard_enabled=false",
                "dpo.val_period=4",
                "checkpointing.save_period=2",
                "policy.megatron_cfg.scheduler.lr_decay_iters=4",  # the resumed legs share one LR schedule
                *overrides,
            ],
        )
    )
    with local_ray(2, tmp_path / "mcore"):
        return run_dpo(validate_dpo_config(resolved), resolved)


def test_dpo_margin_grows_and_resume_is_exact(tmp_path):
    full = _dpo(tmp_path, tmp_path / "full", "dpo.max_num_steps=4")
    assert full.final_step == 4
    train = read_metrics(tmp_path / "full" / "logs", "train")
    assert [m["step"] for m in train] == [1, 2, 3, 4]
    first = train[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["margin"] == pytest.approx(0.0, abs=1e-5)
    assert max(m["max_input_length"] for m in train) > ORIGINAL_WINDOW  # positions only YaRN covers
    for m in train:
        assert math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])

    val = {m["step"]: m for m in read_metrics(tmp_path / "full" / "logs", "validation")}
    assert sorted(val) == [0, 4]
    assert val[0]["margin"] == pytest.approx(0.0, abs=1e-5) and val[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert val[4]["margin"] > 0.1, val[4]
    assert val[4]["accuracy"] > 0.6 and val[4]["loss"] < math.log(2) - 0.05, val[4]
    assert val[4]["chosen_reward"] > val[4]["rejected_reward"]

    resumed_dir = tmp_path / "resumed"
    _dpo(tmp_path, resumed_dir, "dpo.max_num_steps=2")
    resumed = _dpo(tmp_path, resumed_dir, "dpo.max_num_steps=4")
    assert resumed.final_step == 4
    again = read_metrics(resumed_dir / "logs", "train")
    assert [m["step"] for m in again] == [1, 2, 3, 4]  # each step logged once across the two processes
    for step in (3, 4):
        for key in ("loss", "margin", "accuracy", "chosen_reward", "rejected_reward"):
            assert again[step - 1][key] == pytest.approx(train[step - 1][key], abs=1e-5), (step, key)
