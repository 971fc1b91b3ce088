"""GRPO's advantages and clipped policy-gradient loss against hand computations on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from nemo_rl.algorithms.advantages import group_advantages, token_weights
from nemo_rl.algorithms.importance_correction import ImportanceCorrection
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
        importance_weight=[2.0, 1.0, 7.0],  # the driver's (importance_correction); 7 sits on no loss token
        token_weight=[1.0, 3.0, 1.0],
    )
    numerator, _, metrics = ClippedPGLoss(importance_correction=ImportanceCorrection(weighted=True))(logp, batch)
    # r = 1, A = 1: per token -1, weighted by importance_weight = [2, 1] and token_weight = [1, 3]
    assert float(numerator.detach()) == pytest.approx(-(2 * 1 + 1 * 3))
    assert float(metrics["is_weight_sum"]) == pytest.approx(2 + 1)
    numerator.backward()
    # d(-r A w)/d logp = -r A w (r = exp(logp - prev)), inside the clip range
    torch.testing.assert_close(logp.grad, torch.tensor([[-2.0, -3.0, 0.0]]))


def test_decoupled_clip_clips_each_side_at_its_own_bound():
    """DAPO's clip higher is ratio_clip_max > ratio_clip_min: [1 - 0.2, 1 + 0.28] here."""
    ratios = [1.25, 1.3, 0.85, 0.75]  # inside and outside the upper bound 1.28, inside and outside the lower 0.8
    logp = torch.log(torch.tensor([ratios])).requires_grad_()
    batch = {
        "token_mask": torch.ones(1, 4),
        "advantages": torch.tensor([[1.0, 1.0, -1.0, -1.0]]),  # each side's clip binds for its advantage sign
        "prev_logprobs": torch.zeros(1, 4),
        "reference_logprobs": torch.zeros(1, 4),
    }
    numerator, _, metrics = ClippedPGLoss(ratio_clip_min=0.2, ratio_clip_max=0.28)(logp, batch)
    # A > 0: max(-r, -clip(r)) = -1.25 (unclipped), -1.28 (clipped at 1 + 0.28, not 1.2);
    # A < 0: max(r, clip(r)) = 0.85 (unclipped), 0.8 (clipped at 1 - 0.2)
    assert float(numerator.detach()) == pytest.approx(-1.25 - 1.28 + 0.85 + 0.8)
    assert float(metrics["clipped_tokens"]) == 2
    numerator.backward()
    # unclipped tokens: d(-A r)/d logp = -A r; clipped ones: no gradient
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.25, 0.0, 0.85, 0.0]]))
    symmetric, _, _ = ClippedPGLoss(ratio_clip_min=0.2, ratio_clip_max=0.2)(logp.detach(), batch)
    assert float(symmetric) == pytest.approx(-1.2 - 1.2 + 0.85 + 0.8)  # 1.25 clipped too at 1 + 0.2


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
