"""GRPO end to end with the peers' options on: the train/generate mismatch corrections and DAPO's pieces.

Each option's arithmetic is checked by hand in the unit tests
(``test_mismatch_corrections``, ``test_dynamic_sampling``,
``test_reward_shaping``); here two real runs (Ray, the Megatron policy, vLLM,
the math environment) each turn on a set of them, take two GRPO steps of two
optimizer steps each (so the second update of a rollout is off-policy and the
ratios move), and must finish with finite metrics that show each option acted:

* token level: truncated importance sampling with ICE-POP's token mask, and
  dynamic sampling (correctness-only rewards, so most groups score all 0 and
  are dropped and refilled);
* sequence level: GSPO's sequence ratios with sequence-level truncated
  importance sampling and the sequence mask, and the overlong reward shaping.
"""

from __future__ import annotations

import math

import pytest

from nemo_rl.utils.logger import read_metrics
from tests.functional.test_grpo_math import DEFAULT, PARITY_BOUND, _grpo
from tests.unit.test_mismatch_corrections import ALL_ON

pytestmark = [pytest.mark.functional, pytest.mark.slow]

COMMON = (
    "grpo.max_num_steps=2",
    "grpo.val_period=0",
    "checkpointing.enabled=false",
    "policy.train_global_batch_size=8",  # two optimizer steps per rollout: the second is off-policy
)
TOKEN_LEVEL = (
    "loss_fn.use_importance_sampling_correction=true",
    "loss_fn.truncated_importance_sampling_ratio=1.5",
    "loss_fn.importance_sampling_mask=token",
    "grpo.use_dynamic_sampling=true",
    "grpo.dynamic_sampling_max_gen_batches=3",
    "env.math.format_reward_weight=0",
)
SEQUENCE_LEVEL = (
    *ALL_ON,  # sequence-level TIS and mask, GSPO with sequence averaging
    "grpo.reward_shaping.enabled=true",
    "grpo.reward_shaping.overlong_buffer_length=8",
)


def _train_metrics(tmp_path, name: str, options: tuple[str, ...]) -> list[dict]:
    _grpo(tmp_path, DEFAULT, tmp_path / name, *COMMON, *options)
    train = read_metrics(tmp_path / name / "logs", "train")
    assert [m["step"] for m in train] == [1, 2]
    for m in train:
        assert all(math.isfinite(v) for v in m.values() if isinstance(v, float)), m
        assert 1.0 <= m["token_mult_prob_error"] < PARITY_BOUND, m
        assert 0.0 <= m["is_masked_fraction"] <= 1.0 and m["is_weight_mean"] > 0, m
    return train


def test_token_level_corrections_and_dynamic_sampling(tmp_path):
    train = _train_metrics(tmp_path, "token", TOKEN_LEVEL)
    for m in train:
        assert 0.0 <= m["is_truncated_fraction"] <= 1.0, m
        batches, kept = m["dynamic_sampling/generation_batches"], m["dynamic_sampling/kept_groups"]
        assert 1 <= batches <= 3 and m["dynamic_sampling/trained_groups"] >= 1, m
        assert kept + m["dynamic_sampling/dropped_groups"] == 4 * batches, m  # every group generated is accounted for
    assert any(m["dynamic_sampling/generation_batches"] > 1 for m in train)  # all-zero groups were refilled


def test_sequence_level_corrections_gspo_and_overlong_shaping(tmp_path):
    train = _train_metrics(tmp_path, "sequence", SEQUENCE_LEVEL)
    for m in train:
        assert m["sequence_ratio_mean"] > 0 and 0.0 <= m["sequence_clip_fraction"] <= 1.0, m
        assert -1.0 <= m["reward_shaping/penalty_mean"] <= 0.0 and 0.0 <= m["reward_shaping/penalized_fraction"] <= 1, m
        assert m["reward_shaping/reward_mean"] == pytest.approx(m["reward_mean"] + m["reward_shaping/penalty_mean"])
    # The second optimizer step of a rollout sees the first step's update: its sequence ratios leave 1.
    assert any(m["sequence_ratio_mean"] != 1.0 for m in train), train
