"""Losses computed inside policy workers from per-token log-probabilities.

Workers hand a loss the log-probability of every position's next token
(``token_logprobs[:, t] = log p(x[t+1] | x[:t+1])``) and the micro-batch with
``token_mask``: the batch's ``loss_mask`` already aligned with those positions
(``next_token_mask``). The worker aligns it because only the worker knows the
layout: with sequence packing and context parallelism a rank holds pieces of
several samples, and the shift must happen before the sequence is split. A loss
returns ``(numerator, count, metrics)`` in megatron-core's per-token-loss
convention: megatron sums the numerators' gradients over micro-batches and
data-parallel ranks and divides by the summed counts (``finalize_model_grads``),
so the step follows the mean over the *global* batch however it was split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def next_token_mask(loss_mask: torch.Tensor) -> torch.Tensor:
    """Align a per-token mask with next-token log-probs: position t predicts token t+1."""
    shifted = torch.zeros_like(loss_mask, dtype=torch.float32)
    shifted[:, :-1] = loss_mask[:, 1:].float()
    return shifted


@dataclass(frozen=True)
class NLLLoss:
    """Negative log-likelihood of response tokens, averaged over all response tokens of the global batch.

    Averaging per token (not per micro-batch or per sample) keeps long
    responses from being down-weighted and makes the result independent of
    micro-batch size and data-parallel layout.
    """

    def __call__(
        self, token_logprobs: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        mask = batch["token_mask"].to(token_logprobs.device)
        nll_sum = -(token_logprobs * mask).sum()
        num_tokens = mask.sum().to(torch.int)
        return nll_sum, num_tokens, {"nll_sum": nll_sum.detach(), "num_tokens": num_tokens.detach()}
