"""DAPO's overlong reward shaping: the penalty at and around the buffer's edges, its metrics and its config rules."""

from __future__ import annotations

import pytest
import torch

from nemo_rl.algorithms.reward_shaping import OverlongShaping, shaping_metrics
from nemo_rl.config.schema import RewardShapingConfig
from tests.unit.test_grpo_config import errors_of, grpo

ON = "grpo.reward_shaping.enabled=true"


@pytest.mark.parametrize(
    ("length", "penalty"),
    [
        (0, 0.0),
        (11, 0.0),
        (12, 0.0),  # Lmax - B: the last length without a penalty
        (13, -0.125),  # 1 of 4 buffer tokens used, times P = 0.5
        (14, -0.25),
        (15, -0.375),
        (16, -0.5),  # Lmax: the full penalty
        (17, -0.5),  # beyond Lmax: still the full penalty
        (100, -0.5),
    ],
)
def test_penalty_around_the_buffer(length, penalty):
    shaping = OverlongShaping(max_response_length=16, buffer_length=4, penalty=0.5)
    assert shaping.penalties([length]).item() == pytest.approx(penalty)


def test_a_buffer_as_long_as_the_maximum_penalises_from_the_first_token():
    shaping = OverlongShaping(max_response_length=4, buffer_length=4, penalty=1.0)
    assert shaping.penalties([0, 1, 2, 4, 5]).tolist() == [0.0, -0.25, -0.5, -1.0, -1.0]


def test_shaping_metrics():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.5])
    penalties = torch.tensor([0.0, -0.25, -1.0, 0.0])
    assert shaping_metrics(rewards, penalties) == {
        "reward_shaping/penalty_mean": pytest.approx(-0.3125),
        "reward_shaping/penalized_fraction": 0.5,
        "reward_shaping/reward_mean": pytest.approx((1.0 - 0.25 + 0.0 + 0.5) / 4),
    }


def test_max_response_length_defaults_to_max_new_tokens():
    cfg = RewardShapingConfig(enabled=True, overlong_buffer_length=4, overlong_buffer_penalty=2.0)
    assert OverlongShaping.of(cfg, 16) == OverlongShaping(16, 4, 2.0)
    explicit = RewardShapingConfig(enabled=True, overlong_buffer_length=4, max_response_length=12)
    assert OverlongShaping.of(explicit, 16) == OverlongShaping(12, 4, 1.0)
    assert OverlongShaping.of(RewardShapingConfig(), 16) is None


# ----------------------------------------------------------------------------
# config rules (grpo_math.yaml: max_new_tokens 16)
# ----------------------------------------------------------------------------
def test_shipped_recipe_has_both_options_off():
    loop = grpo().grpo
    assert loop.use_dynamic_sampling is False and loop.batch_multiplier == 1
    assert loop.reward_shaping.enabled is False
    on = grpo(ON, "grpo.use_dynamic_sampling=true", "grpo.batch_multiplier=2").grpo
    assert on.reward_shaping.overlong_buffer_length == 4 and on.reward_shaping.max_response_length is None


def test_a_buffer_longer_than_max_new_tokens_is_refused():
    errors = errors_of(ON, "grpo.reward_shaping.overlong_buffer_length=17")
    assert errors == [
        "grpo.reward_shaping.overlong_buffer_length: 17 is longer than the maximum response length 16 of "
        "policy.generation.max_new_tokens (grpo.reward_shaping.max_response_length is null); set "
        "grpo.reward_shaping.overlong_buffer_length to at most 16"
    ]
    assert grpo(ON, "grpo.reward_shaping.overlong_buffer_length=16").grpo.reward_shaping.overlong_buffer_length == 16


def test_a_buffer_longer_than_max_response_length_is_refused():
    (error,) = errors_of(
        ON, "grpo.reward_shaping.overlong_buffer_length=9", "grpo.reward_shaping.max_response_length=8"
    )
    assert error.startswith("grpo.reward_shaping.overlong_buffer_length: 9 is longer than the maximum response ")
    assert "8 of grpo.reward_shaping.max_response_length" in error


def test_a_buffer_no_response_reaches_is_refused():
    (error,) = errors_of(
        ON, "grpo.reward_shaping.max_response_length=40", "grpo.reward_shaping.overlong_buffer_length=8"
    )
    assert "40 - 8 = 32 tokens, but policy.generation.max_new_tokens = 16" in error and "nothing would be" in error


def test_shaping_without_a_buffer_length_is_refused():
    (error,) = errors_of(ON, "grpo.reward_shaping.overlong_buffer_length=null")
    assert error.startswith("grpo.reward_shaping.overlong_buffer_length: required with grpo.reward_shaping.enabled")
    assert grpo("grpo.reward_shaping.overlong_buffer_length=null").grpo.reward_shaping.enabled is False


def test_batch_multiplier_needs_dynamic_sampling():
    (error,) = errors_of("grpo.batch_multiplier=3")
    assert error.startswith("grpo.batch_multiplier: 3 over-samples prompts for dynamic sampling only")
    assert "set grpo.use_dynamic_sampling=true or grpo.batch_multiplier=1" in error
