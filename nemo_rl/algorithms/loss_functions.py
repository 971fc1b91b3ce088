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
A loss whose unit is the sample (DPO's pair, the reward model's pair) counts
samples instead of tokens.

The returned ``metrics`` are sums over the micro-batch (parts); a loss declares
in ``metrics`` what is logged from them (``Metric``: a total, or a ratio of
totals such as the loss per token), and ``nemo_rl.models.policy.loss_metrics``
reduces them over micro-batches, ranks and steps.

A loss declares what it reads from the model in a ``model_output`` attribute:
``"token_logprobs"`` (the default, above), ``"scores"`` (a reward model's
``[B, L]`` scalar head output) or ``"logits"`` (``[B, L, V/TP]``, this tensor
parallel rank's slice of the vocabulary). Unpadded micro-batches also carry
their per-sample fields (``[B]``, e.g. ``input_lengths``).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from nemo_rl.algorithms.importance_correction import ImportanceCorrection
from nemo_rl.models.policy.interfaces import Metric, ModelOutput


@dataclass(frozen=True)
class NLLLoss:
    """Negative log-likelihood of response tokens, averaged over all response tokens of the global batch.

    Averaging per token (not per micro-batch or per sample) keeps long
    responses from being down-weighted and makes the result independent of
    micro-batch size and data-parallel layout.
    """

    model_output: ClassVar[ModelOutput] = "token_logprobs"
    metrics: ClassVar[Mapping[str, Metric]] = {
        "loss": Metric("nll_sum", per="num_tokens"),
        "num_loss_tokens": Metric("num_tokens"),
    }

    def __call__(
        self, token_logprobs: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        mask = batch["token_mask"].to(token_logprobs.device)
        nll_sum = -(token_logprobs * mask).sum()
        num_tokens = mask.sum().to(torch.int)
        return nll_sum, num_tokens, {"nll_sum": nll_sum.detach(), "num_tokens": num_tokens.detach()}


_CLIPPED_PG_METRICS: Mapping[str, Metric] = {
    "loss": Metric("loss_sum", per="num_tokens"),
    "kl": Metric("kl_sum", per="num_tokens"),
    "clip_fraction": Metric("clipped_tokens", per="num_tokens"),
}
# GSPO's: per-sequence means (a sequence's tokens each count 1 / its length, wherever they are).
_SEQUENCE_RATIO_METRICS: Mapping[str, Metric] = {
    "sequence_ratio_mean": Metric("sequence_ratio_sum", per="num_sequences"),
    "sequence_clip_fraction": Metric("clipped_sequences", per="num_sequences"),
}


@dataclass(frozen=True)
class ClippedPGLoss:
    """GRPO's clipped policy-gradient loss with a KL penalty to a reference policy.

    Per token: ``max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)) + beta * KL``
    with ``r = exp(logp - prev_logprobs)`` (PPO's ratio to the policy that
    sampled, recomputed by the trainer) and the k3 estimator
    ``KL = exp(ref - logp) - (ref - logp) - 1`` (non-negative, unbiased).
    ``eps_low = ratio_clip_min`` and ``eps_high = ratio_clip_max`` are separate,
    so ``ratio_clip_max > ratio_clip_min`` is DAPO's decoupled clip ("clip
    higher"); DAPO's token-level loss is ``token_weight = 1`` (``token_level_loss``).

    ``importance_correction`` (the generator/trainer mismatch corrections, see
    ``importance_correction``) multiplies each token's loss by the driver's
    ``importance_weight`` field and logs what the corrections did.

    ``sequence_level_importance_ratios`` is GSPO (Zheng et al., 2025): every
    token of sequence i takes the sequence's ratio
    ``s_i = exp(mean over its loss tokens of (logp - prev_logprobs))`` in the
    token form ``sg[s_i] exp(logp_t - sg[logp_t])``, whose value is ``s_i`` (so
    a sequence is clipped as a whole) and whose gradient per token is
    ``s_i grad logp_t``: GSPO's gradient when the loss averages per sequence.
    The means need the ``sequence_id`` field (``importance_correction.sequence_ids``):
    a packed row holds several sequences, and with context parallelism each
    rank holds pieces of each, so the per-sequence sums are all-reduced over
    the context-parallel group (``group``; None: megatron's, when CP > 1).
    ``s_i`` is under a stop-gradient, so no gradient crosses ranks.

    Per-token fields (aligned by the worker): ``advantages``, ``prev_logprobs``,
    ``reference_logprobs``, and optionally ``token_weight``: the driver's
    averaging weight (1 for token-level averaging; ``T / (N n_i)`` for
    sequence-level, where sequence i has n_i loss tokens, N sequences and T
    tokens are in the global batch), so that megatron's division by the global
    token count gives either mean.

    ``metrics``: the class's are logged always; an instance adds those of the
    options it has on, so each is logged only when its option is.
    """

    model_output: ClassVar[ModelOutput] = "token_logprobs"
    metrics: ClassVar[Mapping[str, Metric]] = _CLIPPED_PG_METRICS

    ratio_clip_min: float = 0.2
    ratio_clip_max: float = 0.2
    reference_policy_kl_penalty: float = 0.0
    importance_correction: ImportanceCorrection | None = None
    sequence_level_importance_ratios: bool = False
    group: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        options = dict(self.importance_correction.metrics if self.importance_correction else {})
        if self.sequence_level_importance_ratios:
            options |= _SEQUENCE_RATIO_METRICS
        object.__setattr__(self, "metrics", {**_CLIPPED_PG_METRICS, **options})

    def __call__(
        self, token_logprobs: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        device = token_logprobs.device
        mask = batch["token_mask"].to(device)
        advantages = batch["advantages"].to(device)
        log_ratio = token_logprobs - batch["prev_logprobs"].to(device)
        sequence = self._sequences(log_ratio, batch, mask) if self.sequence_level_importance_ratios else None
        if sequence is None:
            ratio = torch.exp(log_ratio)
        else:
            ratio = torch.exp(sequence.mean_log_ratio) * torch.exp(token_logprobs - token_logprobs.detach())
        clipped = ratio.clamp(1 - self.ratio_clip_min, 1 + self.ratio_clip_max)
        unclipped_loss, clipped_loss = -advantages * ratio, -advantages * clipped
        per_token = torch.maximum(unclipped_loss, clipped_loss)
        log_ref_ratio = batch["reference_logprobs"].to(device) - token_logprobs
        kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1
        if self.reference_policy_kl_penalty:
            per_token = per_token + self.reference_policy_kl_penalty * kl
        weight = mask * batch["token_weight"].to(device) if "token_weight" in batch else mask
        if self.importance_correction is not None:
            weight = weight * batch["importance_weight"].to(device)
        numerator = (per_token * weight).sum()
        num_tokens = mask.sum().to(torch.int)
        clipped_tokens = (clipped_loss > unclipped_loss) * mask
        metrics = {
            "loss_sum": numerator.detach(),
            "num_tokens": num_tokens.detach(),
            "kl_sum": (kl * mask).sum().detach(),
            "clipped_tokens": clipped_tokens.sum().detach(),
        }
        if self.importance_correction is not None:
            metrics |= self.importance_correction.parts(batch, mask)
        if sequence is not None:
            metrics |= sequence.parts(ratio.detach(), clipped_tokens, mask)
        return numerator, num_tokens, metrics

    def _sequences(self, log_ratio: torch.Tensor, batch: dict[str, torch.Tensor], mask: torch.Tensor) -> _Sequences:
        group = self.group if self.group is not None else megatron_cp_group()
        return _Sequences.of(log_ratio.detach(), batch["sequence_id"].to(log_ratio.device), mask, group)


@dataclass(frozen=True)
class _Sequences:
    """Per token, its sequence's mean log-ratio and loss-token count, over every micro-batch piece of it."""

    mean_log_ratio: torch.Tensor
    length: torch.Tensor

    @classmethod
    def of(cls, log_ratio: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, group: Any) -> _Sequences:
        ids = ids.long()
        size = ids.max().reshape(1) + 1
        if group is not None:  # every rank's buffer the same size: the largest id any rank holds
            torch.distributed.all_reduce(size, torch.distributed.ReduceOp.MAX, group=group)
        sums = torch.zeros((2, int(size)), dtype=log_ratio.dtype, device=log_ratio.device)
        sums[0].index_add_(0, ids.flatten(), (log_ratio * mask).flatten())
        sums[1].index_add_(0, ids.flatten(), mask.flatten().to(log_ratio.dtype))
        if group is not None:
            torch.distributed.all_reduce(sums, group=group)
        length = sums[1].clamp(min=1)
        return cls((sums[0] / length)[ids], length[ids])

    def parts(self, ratio: torch.Tensor, clipped_tokens: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sums in which each sequence counts once: its tokens each add 1 / its length."""
        share = mask / self.length
        return {
            "sequence_ratio_sum": (ratio * share).sum(),
            "num_sequences": share.sum(),
            "clipped_sequences": (clipped_tokens / self.length).sum(),
        }


def megatron_cp_group() -> Any:
    """Megatron's context-parallel group when it splits sequences (CP > 1), else None.

    Looked up in ``sys.modules`` (as ``megatron_tp_group``): a process that
    never initialised megatron (the driver, the DTensor worker, a test) has no
    context parallelism, and importing megatron costs seconds.
    """
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is None or not parallel_state.model_parallel_is_initialized():
        return None
    if parallel_state.get_context_parallel_world_size() == 1:
        return None
    return parallel_state.get_context_parallel_group()


def _pairs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) of per-row values whose rows alternate chosen, rejected (``collate_pairs``)."""
    if values.shape[0] % 2:
        raise ValueError(f"a preference micro-batch needs whole (chosen, rejected) pairs, got {values.shape[0]} rows")
    return values[0::2], values[1::2]


@dataclass(frozen=True)
class DPOLoss:
    """Direct preference optimization, optionally with an NLL term on the chosen responses.

    Each sequence's implicit reward is ``beta * (log pi(y|x) - log pi_ref(y|x))``
    summed over its response tokens (averaged with ``average_log_probs``); the
    pair's loss is ``-log sigmoid(r_chosen - r_rejected)``. ``sft_loss_weight``
    adds the chosen response's per-token NLL, which keeps the chosen
    likelihood from falling while the margin grows. The unit is the pair: the
    count is the number of pairs, so the step follows the mean over the global
    batch's pairs. Needs ``reference_logprobs`` (aligned per-token field).
    """

    model_output: ClassVar[ModelOutput] = "token_logprobs"
    metrics: ClassVar[Mapping[str, Metric]] = {
        "loss": Metric("loss_sum", per="num_pairs"),
        "preference_loss": Metric("preference_loss_sum", per="num_pairs"),
        "sft_loss": Metric("sft_loss_sum", per="num_pairs"),
        "accuracy": Metric("accuracy_sum", per="num_pairs"),
        "margin": Metric("margin_sum", per="num_pairs"),
        "chosen_reward": Metric("chosen_reward_sum", per="num_pairs"),
        "rejected_reward": Metric("rejected_reward_sum", per="num_pairs"),
    }

    beta: float
    sft_loss_weight: float = 0.0
    average_log_probs: bool = False

    def __call__(
        self, token_logprobs: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        device = token_logprobs.device
        mask = batch["token_mask"].to(device)
        tokens = mask.sum(-1).clamp(min=1)
        logprob = (token_logprobs * mask).sum(-1)
        policy, reference = logprob, (batch["reference_logprobs"].to(device) * mask).sum(-1)
        if self.average_log_probs:
            policy, reference = policy / tokens, reference / tokens
        chosen, rejected = _pairs(self.beta * (policy - reference))
        margin = chosen - rejected
        preference = -torch.nn.functional.logsigmoid(margin)
        (chosen_logprob, _), (chosen_tokens, _) = _pairs(logprob), _pairs(tokens)
        sft = -chosen_logprob / chosen_tokens
        numerator = (preference + self.sft_loss_weight * sft).sum()
        num_pairs = torch.tensor(margin.shape[0], dtype=torch.int, device=device)
        metrics = {
            "loss_sum": numerator.detach(),
            "preference_loss_sum": preference.sum().detach(),
            "sft_loss_sum": sft.sum().detach(),
            "accuracy_sum": (margin > 0).sum().detach(),
            "margin_sum": margin.sum().detach(),
            "chosen_reward_sum": chosen.sum().detach(),
            "rejected_reward_sum": rejected.sum().detach(),
            "num_pairs": num_pairs,
        }
        return numerator, num_pairs, metrics


@dataclass(frozen=True)
class BradleyTerryLoss:
    """The reward model's pairwise loss ``-log sigmoid(s_chosen - s_rejected)``, one unit per pair.

    A sequence's score is the scalar head's output at its last token
    (``input_lengths - 1``), the position that has read all of it, which is
    also where HF's ``*ForSequenceClassification`` pools.
    """

    model_output: ClassVar[ModelOutput] = "scores"
    metrics: ClassVar[Mapping[str, Metric]] = {
        "loss": Metric("loss_sum", per="num_pairs"),
        "accuracy": Metric("accuracy_sum", per="num_pairs"),
        "margin": Metric("margin_sum", per="num_pairs"),
        "chosen_score": Metric("chosen_score_sum", per="num_pairs"),
        "rejected_score": Metric("rejected_score_sum", per="num_pairs"),
    }

    def __call__(
        self, scores: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        last = batch["input_lengths"].to(scores.device) - 1
        chosen, rejected = _pairs(scores[torch.arange(scores.shape[0], device=scores.device), last])
        margin = chosen - rejected
        losses = -torch.nn.functional.logsigmoid(margin)
        numerator = losses.sum()
        num_pairs = torch.tensor(margin.shape[0], dtype=torch.int, device=scores.device)
        metrics = {
            "loss_sum": numerator.detach(),
            "accuracy_sum": (margin > 0).sum().detach(),
            "margin_sum": margin.sum().detach(),
            "chosen_score_sum": chosen.sum().detach(),
            "rejected_score_sum": rejected.sum().detach(),
            "num_pairs": num_pairs,
        }
        return numerator, num_pairs, metrics
