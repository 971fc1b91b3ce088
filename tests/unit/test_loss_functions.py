"""The SFT loss against a hand computation on small tensors."""

from __future__ import annotations

import torch

from nemo_rl.algorithms.loss_functions import NLLLoss
from nemo_rl.data.token_alignment import next_token_mask


def test_next_token_mask_aligns_with_predictions():
    loss_mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 0, 0]])
    # position t predicts token t+1: token 2 is predicted at position 1, etc.
    assert next_token_mask(loss_mask).tolist() == [[0, 1, 1, 0, 0], [1, 1, 0, 0, 0]]


def test_nll_numerator_and_count():
    logprobs = torch.log(torch.tensor([[0.5, 0.25, 0.1, 0.9], [0.2, 0.4, 0.8, 0.3]]))
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1]])  # predictions at (0,0),(0,1) and (1,1),(1,2)
    nll_sum, count, metrics = NLLLoss()(logprobs, {"token_mask": next_token_mask(mask)})
    expected = -torch.log(torch.tensor([0.5, 0.25, 0.4, 0.8])).sum()
    torch.testing.assert_close(nll_sum, expected)
    assert count.item() == 4 and count.dtype == torch.int
    torch.testing.assert_close(metrics["nll_sum"], expected)


def test_split_batches_give_the_global_token_mean():
    """What megatron does with (numerator, count) pairs: sum both, then divide."""
    torch.manual_seed(0)
    logprobs = -torch.rand(4, 6)
    mask = (torch.rand(4, 6) > 0.3).long()
    whole_sum, whole_count, _ = NLLLoss()(logprobs, {"token_mask": mask})
    parts = [NLLLoss()(logprobs[i : i + 1], {"token_mask": mask[i : i + 1]}) for i in range(4)]
    torch.testing.assert_close(sum(p[0] for p in parts) / sum(p[1] for p in parts), whole_sum / whole_count)
    # ...which is not the mean of per-micro-batch means when lengths differ.
    per_batch_means = torch.stack([p[0] / p[1] for p in parts]).mean()
    assert not torch.isclose(per_batch_means, whole_sum / whole_count)
