"""On-policy distillation end to end on CPU: student, teacher and vLLM on one bundle, YaRN at 4x.

What is checked:

* the teacher's top-k log-probs, computed on Megatron from vocab-parallel
  logits, equal transformers' ``log_softmax(...).topk`` of the teacher's HF
  model with the same YaRN overrides, on sequences past the 256-token window;
* the student's KL to the teacher falls over the steps, on the student's
  own vLLM samples, while the parity probe stays at 1.0 (every refit landed);
* validation reports the KL on greedy answers; checkpoints are written.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from nemo_rl.utils.logger import read_metrics
from tests.helpers import local_ray

pytestmark = [pytest.mark.functional, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = ROOT / "examples" / "configs" / "distillation_math.yaml"
ORIGINAL_WINDOW = 256
PARITY_BOUND = 1.001


def _hf_teacher(run):
    from transformers import AutoConfig, AutoModelForCausalLM

    overrides = run.cfg.policy.effective_hf_config_overrides
    config = AutoConfig.from_pretrained(run.teacher_path, **overrides)
    return AutoModelForCausalLM.from_pretrained(run.teacher_path, config=config, dtype=torch.float32).eval()


def assert_teacher_topk_matches_hf(run) -> None:
    """The teacher's summary of four long validation prompts (+ a short fake response), through the run's own
    layout (packing, context parallelism), equals transformers' ``log_softmax(...).topk`` of the teacher."""
    from nemo_rl.algorithms.rollout_training import rollout_batch
    from nemo_rl.models.generation.vllm_worker import Completion

    long = [s for s in run.val_data.samples if len(s.input_ids) > ORIGINAL_WINDOW][:4]
    assert len(long) == 4
    reply = Completion(token_ids=[5, 6, 7], logprobs=[0.0, 0.0, 0.0], text="", finish_reason="stop")
    divisible_by = run.cfg.policy.make_sequence_length_divisible_by
    batch = rollout_batch(long, [reply] * 4, torch.zeros(4), run.tokenizer.pad_token_id, divisible_by)
    values, indices = run.teacher.get_topk_logprobs(batch, 4, 8)
    with torch.no_grad():
        reference = torch.log_softmax(_hf_teacher(run)(input_ids=batch["input_ids"]).logits.float(), -1)
    expected = reference.topk(8, dim=-1)
    for row, length in enumerate(batch["input_lengths"].tolist()):
        # Row t of the teacher's summary describes token t (predicted at t - 1), like get_logprobs.
        torch.testing.assert_close(values[row, 1:length], expected.values[row, : length - 1], atol=1e-4, rtol=1e-4)
        assert (indices[row, 1:length, 0] == expected.indices[row, : length - 1, 0]).float().mean() > 0.99


def train_checking_the_teacher(resolved: dict):
    """A distillation run of the resolved config: the teacher's top-k checked against HF first, then trained."""
    from nemo_rl.algorithms.distillation import DistillationRun
    from nemo_rl.config.schema import validate_distillation_config

    run = DistillationRun(validate_distillation_config(resolved), resolved)
    try:
        assert_teacher_topk_matches_hf(run)
        return run.train()
    finally:
        run.close()


def test_distillation_kl_falls_and_teacher_topk_matches_hf(tmp_path):
    from nemo_rl.config.loader import load_config, resolve_config

    resolved = resolve_config(
        load_config(
            DEFAULT,
            [
                f"logger.log_dir={tmp_path / 'logs'}",
                f"checkpointing.checkpoint_dir={tmp_path / 'ckpt'}",
                "logger.tensorboard_enabled=false",
                "distillation.max_num_steps=12",
                "distillation.val_period=12",
                "distillation.val_at_start=true",
                "checkpointing.save_period=12",
                "policy.megatron_cfg.optimizer.lr=3e-3",
                "policy.megatron_cfg.optimizer.min_lr=3e-3",
            ],
        )
    )
    with local_ray(2, tmp_path / "mcore"):
        result = train_checking_the_teacher(resolved)

    assert result.final_step == 12
    train = read_metrics(tmp_path / "logs", "train")
    assert [m["step"] for m in train] == list(range(1, 13))
    for m in train:
        assert 1.0 <= m["token_mult_prob_error"] < PARITY_BOUND, m
        assert math.isfinite(m["kl"]) and m["kl"] >= 0
        assert 0.0 <= m["env/accuracy"] <= m["reward_mean"]  # the environment's own metric: reward minus format term
    assert max(m["sequence_length_max"] for m in train) > ORIGINAL_WINDOW
    kl = [m["kl"] for m in train]
    assert sum(kl[-3:]) / 3 < sum(kl[:3]) / 3 - 0.05, kl
    val = {m["step"]: m for m in read_metrics(tmp_path / "logs", "validation")}
    assert sorted(val) == [0, 12]
    assert val[12]["kl"] < val[0]["kl"], val
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step_12"]
