"""Losses computed inside policy workers from per-token log-probabilities.

Workers hand a loss the log-probability of every position's next token
(``token_logprobs[:, t] = log p(x[t+1] | x[:t+1])``) and the micro-batch's
per-token fields aligned with those positions (``align_to_predictions``):
``token_mask`` is the batch's ``loss_mask`` shifted, and every other per-token
field (``generation_logprobs``, ``advantages``, ...: indexed by the token it
describes) is shifted the same way under its own name. The worker aligns them
because only the worker knows the layout: with sequence packing and context
parallelism a rank holds pieces of several samples, and the shift must happen
before the sequence is split. A loss
returns ``(numerator, count, metrics)`` in megatron-core's per-token-loss
convention: megatron sums the numerators' gradients over micro-batches and
data-parallel ranks and divides by the summed counts (``finalize_model_grads``),
so the step follows the mean over the *global* batch however it was split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Per-position inputs of the model itself; every other [B, L] field describes the token at its index.
_MODEL_INPUTS = ("input_ids", "position_ids")


def next_token_mask(loss_mask: torch.Tensor) -> torch.Tensor:
    """Align a per-token mask with next-token log-probs: position t predicts token t+1."""
    return _shift(loss_mask.float())


def _shift(field: torch.Tensor) -> torch.Tensor:
    shifted = torch.zeros_like(field)
    shifted[:, :-1] = field[:, 1:]
    return shifted


def token_fields(batch: dict[str, torch.Tensor]) -> list[str]:
    """Names of the per-token fields of a batch (shaped like ``input_ids``, not model inputs)."""
    shape = batch["input_ids"].shape
    return [k for k, v in batch.items() if k not in _MODEL_INPUTS and torch.is_tensor(v) and v.shape == shape]


def align_to_predictions(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every per-token field moved to the position that predicts its token; ``loss_mask`` becomes ``token_mask``."""
    aligned = {("token_mask" if k == "loss_mask" else k): _shift(batch[k]) for k in token_fields(batch)}
    if "token_mask" in aligned:
        aligned["token_mask"] = aligned["token_mask"].float()
    return aligned


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


@dataclass(frozen=True)
class ClippedPGLoss:
    """GRPO's clipped policy-gradient loss with a KL penalty to a reference policy.

    Per token: ``max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)) + beta * KL``
    with ``r = exp(logp - prev_logprobs)`` (PPO's ratio to the policy that
    sampled, recomputed by the trainer) and the k3 estimator
    ``KL = exp(ref - logp) - (ref - logp) - 1`` (non-negative, unbiased).

    With ``importance_sampling_correction`` each token is weighted by
    ``exp(prev_logprobs - generation_logprobs)``: the generator (vLLM) and the
    trainer compute slightly different probabilities, so the samples come from
    a policy a little off the trainer's; the weight corrects for that.

    Per-token fields (aligned by the worker): ``advantages``, ``prev_logprobs``,
    ``reference_logprobs``, ``generation_logprobs`` (with the correction), and
    optionally ``token_weight``: the driver's averaging weight (1 for
    token-level averaging; ``T / (N n_i)`` for sequence-level, where sequence i
    has n_i loss tokens, N sequences and T tokens are in the global batch), so
    that megatron's division by the global token count gives either mean.
    """

    ratio_clip_min: float = 0.2
    ratio_clip_max: float = 0.2
    reference_policy_kl_penalty: float = 0.0
    importance_sampling_correction: bool = False

    def __call__(
        self, token_logprobs: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        device = token_logprobs.device
        mask = batch["token_mask"].to(device)
        advantages = batch["advantages"].to(device)
        prev = batch["prev_logprobs"].to(device)
        ratio = torch.exp(token_logprobs - prev)
        clipped = ratio.clamp(1 - self.ratio_clip_min, 1 + self.ratio_clip_max)
        unclipped_loss, clipped_loss = -advantages * ratio, -advantages * clipped
        per_token = torch.maximum(unclipped_loss, clipped_loss)
        log_ref_ratio = batch["reference_logprobs"].to(device) - token_logprobs
        kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1
        if self.reference_policy_kl_penalty:
            per_token = per_token + self.reference_policy_kl_penalty * kl
        if self.importance_sampling_correction:
            per_token = per_token * torch.exp(prev - batch["generation_logprobs"].to(device)).detach()
        weight = mask * batch["token_weight"].to(device) if "token_weight" in batch else mask
        numerator = (per_token * weight).sum()
        num_tokens = mask.sum().to(torch.int)
        metrics = {
            "loss_sum": numerator.detach(),
            "num_tokens": num_tokens.detach(),
            "kl_sum": (kl * mask).sum().detach(),
            "clipped_tokens": ((clipped_loss > unclipped_loss) * mask).sum().detach(),
        }
        return numerator, num_tokens, metrics
