"""The train/generate parity probe against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from nemo_rl.algorithms.logprob_parity import ParityError, check_first_step, token_mult_prob_error


def test_identical_logprobs_give_exactly_one():
    logprobs = torch.tensor([[-0.3, -1.2, -4.0], [-0.01, -2.5, -0.7]])
    assert token_mult_prob_error(logprobs, logprobs.clone(), torch.ones(2, 3)) == 1.0


def test_known_gaps_give_the_mean_of_exp_gap():
    generation = torch.tensor([[-1.0, -2.0, -0.5, 0.0]])
    policy = torch.tensor([[-1.1, -2.3, -0.5, 0.0]])  # gaps 0.1 and 0.3 on the masked tokens
    mask = torch.tensor([[1, 1, 0, 0]])
    expected = (math.exp(0.1) + math.exp(0.3)) / 2
    assert token_mult_prob_error(generation, policy, mask) == pytest.approx(expected, rel=1e-6)


def test_masked_out_tokens_are_ignored_even_if_huge():
    generation = torch.tensor([[-1.0, -50.0, -2.0], [-0.5, 0.0, -80.0]])
    policy = torch.tensor([[-1.2, -1.0, -2.0], [-0.5, -70.0, -1.0]])
    mask = torch.tensor([[1, 0, 1], [1, 0, 0]])  # gaps 0.2, 0, 0 kept; 49, 70, 79 dropped
    expected = (math.exp(0.2) + 1 + 1) / 3
    assert token_mult_prob_error(generation, policy, mask) == pytest.approx(expected, rel=1e-6)


def test_error_is_sign_symmetric():
    a = torch.tensor([[-1.0, -2.0, -3.0]])
    b = torch.tensor([[-1.25, -1.5, -3.1]])
    mask = torch.ones(1, 3)
    expected = (math.exp(0.25) + math.exp(0.5) + math.exp(0.1)) / 3
    assert token_mult_prob_error(a, b, mask) == pytest.approx(expected, rel=1e-6)
    assert token_mult_prob_error(b, a, mask) == pytest.approx(expected, rel=1e-6)


def test_bool_and_float_masks_agree():
    a, b = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -9.0]])
    assert token_mult_prob_error(a, b, torch.tensor([[True, False]])) == pytest.approx(math.exp(0.5))
    assert token_mult_prob_error(a, b, torch.tensor([[1.0, 0.0]])) == pytest.approx(math.exp(0.5))


def test_empty_mask_gives_one():
    a, b = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-5.0, -9.0]])
    assert token_mult_prob_error(a, b, torch.zeros(1, 2)) == 1.0


@pytest.mark.parametrize("error", [1.0, 1.03, 1.05])
def test_first_step_passes_at_or_below_threshold(error):
    check_first_step(error, 1.05, long_context=True, section="grpo")
    check_first_step(error, 1.05, long_context=False, section="grpo")


def test_first_step_above_threshold_stops_with_an_explanation():
    with pytest.raises(ParityError) as info:
        check_first_step(1.2345, 1.05, long_context=False, section="grpo")
    message = str(info.value)
    assert "grpo.token_mult_prob_error_threshold" in message
    assert "1.2345" in message and "1.05" in message
    assert "Nothing was trained" in message
    assert "RoPE" not in message


def test_long_context_failure_points_at_rope_overrides():
    with pytest.raises(ParityError) as info:
        check_first_step(1.5, 1.05, long_context=True, section="grpo")
    message = str(info.value)
    assert "RoPE overrides" in message
    assert "policy.hf_config_overrides" in message
    assert "1.5000" in message and "Nothing was trained" in message


def test_parity_error_is_a_runtime_error():
    assert issubclass(ParityError, RuntimeError)


def test_the_stop_names_the_running_algorithms_threshold():
    with pytest.raises(ParityError) as info:
        check_first_step(1.5, 1.001, long_context=True, section="distillation")
    assert "exceeds distillation.token_mult_prob_error_threshold = 1.001" in str(info.value)
    assert "grpo." not in str(info.value)
