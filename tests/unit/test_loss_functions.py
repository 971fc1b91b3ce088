"""The SFT loss against a hand computation on small tensors."""

from __future__ import annotations

import torch

from nemo_rl.algorithms.loss_functions import NLLLoss, count_loss_tokens, next_token_mask


def test_next_token_mask_aligns_with_predictions():
    loss_mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 0, 0]])
    # position t predicts token t+1: token 2 is predicted at position 1, etc.
    assert next_token_mask(loss_mask).tolist() == [[0, 1, 1, 0, 0], [1, 1, 0, 0, 0]]
    assert count_loss_tokens(loss_mask) == 4


def test_nll_is_normalised_by_the_global_token_count():
    logprobs = torch.log(torch.tensor([[0.5, 0.25, 0.1, 0.9], [0.2, 0.4, 0.8, 0.3]]))
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1]])  # predictions at (0,0),(0,1) and (1,1),(1,2)
    loss, metrics = NLLLoss(global_num_tokens=8)(logprobs, {"loss_mask": mask})
    expected_sum = -(torch.log(torch.tensor(0.5)) + torch.log(torch.tensor(0.25)) + torch.log(torch.tensor(0.4)) + torch.log(torch.tensor(0.8)))
    torch.testing.assert_close(metrics["nll_sum"], expected_sum)
    torch.testing.assert_close(loss, expected_sum / 8)
    assert metrics["num_tokens"] == 4


def test_splitting_a_batch_sums_to_the_whole():
    torch.manual_seed(0)
    logprobs = -torch.rand(4, 6)
    mask = (torch.rand(4, 6) > 0.3).long()
    total = count_loss_tokens(mask)
    whole, _ = NLLLoss(total)(logprobs, {"loss_mask": mask})
    parts = sum(NLLLoss(total)(logprobs[i : i + 2], {"loss_mask": mask[i : i + 2]})[0] for i in (0, 2))
    torch.testing.assert_close(parts, whole)
