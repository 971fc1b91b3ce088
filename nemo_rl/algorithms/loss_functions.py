"""Losses computed inside policy workers from per-token log-probabilities.

Workers hand a loss the log-probability of every position's next token
(``token_logprobs[:, t] = log p(x[t+1] | x[:t+1])``) and the micro-batch; the
loss returns a scalar already normalised by the *global* batch, so summing
gradients over micro-batches and data-parallel ranks yields the global mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def next_token_mask(loss_mask: torch.Tensor) -> torch.Tensor:
    """Align a per-token mask with next-token log-probs: position t predicts token t+1."""
    shifted = torch.zeros_like(loss_mask, dtype=torch.float32)
    shifted[:, :-1] = loss_mask[:, 1:].float()
    return shifted


def count_loss_tokens(loss_mask: torch.Tensor) -> int:
    """Tokens that contribute to the loss (the first token of a sequence is never predicted)."""
    return int(next_token_mask(loss_mask).sum())


@dataclass(frozen=True)
class NLLLoss:
    """Mean negative log-likelihood over all response tokens of the global batch.

    Normalising by the global token count (not per micro-batch or per sample)
    makes the gradient independent of how the batch is split across ranks.
    """

    global_num_tokens: int

    def __call__(self, token_logprobs: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mask = next_token_mask(batch["loss_mask"]).to(token_logprobs.device)
        nll_sum = -(token_logprobs * mask).sum()
        loss = nll_sum / max(self.global_num_tokens, 1)
        return loss, {"nll_sum": nll_sum.detach(), "num_tokens": mask.sum().detach()}
