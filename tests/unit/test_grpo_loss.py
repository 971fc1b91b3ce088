"""GRPO's advantages and clipped policy-gradient loss against hand computations on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from nemo_rl.algorithms.advantages import group_advantages, token_weights
from nemo_rl.algorithms.loss_functions import ClippedPGLoss
from nemo_rl.data.token_alignment import align_to_predictions


def test_group_advantages_with_and_without_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])  # groups of 3: [1, 0, 0], [1, 1, 1]
    centred = group_advantages(rewards, 3, normalize_std=False)
    torch.testing.assert_close(centred, torch.tensor([2 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0]))
    std = torch.tensor([1.0, 0.0, 0.0]).std()  # unbiased, as torch.std
    normalised = group_advantages(rewards, 3)
    torch.testing.assert_close(normalised[:3], torch.tensor([2 / 3, -1 / 3, -1 / 3]) / (std + 1e-6))
    assert normalised[3:].tolist() == [0.0, 0.0, 0.0]  # all equal: no signal, not a division by 0
    with pytest.raises(ValueError, match="multiple of 4"):
        group_advantages(rewards, 4)


def test_token_and_sequence_level_weights():
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 0, 0]])
    torch.testing.assert_close(token_weights(mask, sequence_level=False), mask.float())
    weights = token_weights(mask, sequence_level=True)  # T = 4 tokens, N = 2 sequences: T / (N n_i)
    torch.testing.assert_close(weights, torch.tensor([[0, 2 / 3, 2 / 3, 2 / 3], [0, 2.0, 0, 0]]))
    per_token = torch.tensor([[9.0, 1.0, 2.0, 3.0], [9.0, 10.0, 9.0, 9.0]])
    # weighted sum / T = mean over sequences of each sequence's token mean = (2 + 10) / 2
    assert float((per_token * weights).sum() / mask.sum()) == pytest.approx(6.0)


def _batch(**fields):
    return {"token_mask": torch.tensor([[1.0, 1.0, 0.0]])} | {k: torch.tensor([v]) for k, v in fields.items()}


def test_clipped_loss_matches_a_hand_computation():
    logp = torch.log(torch.tensor([[0.5, 0.2, 0.9]]))
    prev = torch.log(torch.tensor([0.25, 0.4, 0.9]))
    batch = _batch(advantages=[1.0, -1.0, 5.0], prev_logprobs=prev.tolist(), reference_logprobs=logp[0].tolist())
    numerator, count, metrics = ClippedPGLoss(0.2, 0.2)(logp, batch)
    # token 0: r = 2, A = 1 -> max(-2, -1.2) = -1.2 (clipped); token 1: r = 0.5, A = -1 -> max(0.5, 0.8) = 0.8
    assert float(numerator) == pytest.approx(-1.2 + 0.8)
    assert int(count) == 2 and count.dtype == torch.int
    assert float(metrics["clipped_tokens"]) == 2  # both took the clipped branch
    assert float(metrics["kl_sum"]) == pytest.approx(0.0, abs=1e-7)  # reference equals the policy


def test_kl_penalty_is_the_k3_estimator():
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.5]]))
    ref = math.log(0.25)
    batch = _batch(advantages=[0.0, 0.0, 0.0], prev_logprobs=logp[0].tolist(), reference_logprobs=[ref] * 3)
    numerator, _, metrics = ClippedPGLoss(reference_policy_kl_penalty=0.1)(logp, batch)
    k3 = 0.5 - math.log(0.5) - 1  # exp(ref - logp) - (ref - logp) - 1 with ref - logp = log(0.5)
    assert float(metrics["kl_sum"]) == pytest.approx(2 * k3)
    assert float(numerator) == pytest.approx(0.1 * 2 * k3)


def test_importance_weights_and_gradient():
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.5]])).requires_grad_()
    batch = _batch(
        advantages=[1.0, 1.0, 1.0],
        prev_logprobs=[math.log(0.5)] * 3,
        reference_logprobs=[math.log(0.5)] * 3,
        generation_logprobs=[math.log(0.25), math.log(0.5), 0.0],
        token_weight=[1.0, 3.0, 1.0],
    )
    numerator, _, _ = ClippedPGLoss(importance_sampling_correction=True)(logp, batch)
    # r = 1, A = 1: per token -1, weighted by exp(prev - gen) = [2, 1] and token_weight = [1, 3]
    assert float(numerator) == pytest.approx(-(2 * 1 + 1 * 3))
    numerator.backward()
    # d(-r A w)/d logp = -r A w (r = exp(logp - prev)), inside the clip range
    torch.testing.assert_close(logp.grad, torch.tensor([[-2.0, -3.0, 0.0]]))


def test_per_token_fields_are_moved_to_the_predicting_position():
    batch = {
        "input_ids": torch.tensor([[5, 6, 7]]),
        "loss_mask": torch.tensor([[0, 1, 1]]),
        "advantages": torch.tensor([[0.0, 2.0, 2.0]]),
        "input_lengths": torch.tensor([3]),
    }
    aligned = align_to_predictions(batch)
    assert set(aligned) == {"token_mask", "advantages"}
    assert aligned["token_mask"].tolist() == [[1.0, 1.0, 0.0]]
    assert aligned["advantages"].tolist() == [[2.0, 2.0, 0.0]]
