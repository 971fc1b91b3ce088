"""Driver-side per-token fields of the GRPO loss's corrections for the generator/trainer mismatch.

vLLM samples the responses and the trainer scores them again (``prev_logprobs``);
the two engines' probabilities differ a little (kernels, precision, MoE routing),
so the samples come from a policy slightly off the one trained. Weighting each
token by the ratio ``rho = exp(prev_logprobs - generation_logprobs)`` corrects
for that; its variants bound the weight's variance:

- truncated importance sampling (TIS, Yao et al., "Your Efficient RL Framework
  Secretly Brings You Off-Policy RL Training"): the weight capped at
  ``cap``, per token or, at the sequence level, one weight per sequence,
  the product of its tokens' ratios (the exact sequence likelihood ratio);
- masked importance sampling: tokens whose ratio lies outside ``[mask_min,
  mask_max]`` are dropped (ICE-POP, "The Online IcePop Solution for MoE
  models"; NeMo RL's ``truncated_importance_sampling_type: icepop``), or whole
  sequences whose *geometric-mean* ratio ``exp(mean_t log rho_t)`` does
  (NeMo RL's ``seq-mask-tis``, after Liu, Li et al., "When Speed Kills
  Stability"); the geometric mean, unlike the product, does not grow with the
  sequence's length, so one pair of bounds serves every length.

Both depend only on ``prev_logprobs`` and ``generation_logprobs``, which are
known before the optimizer steps, so the driver computes them once on the
unpacked batch (where a sequence is a row) and the loss multiplies by the
result: packing and context parallelism carry the fields like any per-token
field. The loss reports the fields' sums as metric parts (``parts``).

GSPO's sequence ratio depends on the *current* log-probs, so the loss computes
it; the driver gives it each token's sequence (``sequence_ids``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from nemo_rl.models.policy.interfaces import Metric

if TYPE_CHECKING:
    from nemo_rl.config.schema import ClippedPGLossConfig

Level = Literal["token", "sequence"]

# Each logged metric's part (a sum over loss tokens) and the field it sums.
_PARTS = {
    "is_weight_mean": ("is_weight_sum", "importance_weight"),
    "is_truncated_fraction": ("is_truncated_tokens", "importance_truncated"),
    "is_masked_fraction": ("is_masked_tokens", "importance_masked"),
}


@dataclass(frozen=True)
class ImportanceCorrection:
    """Which corrections are on, and the per-token fields (by token) and metric parts they give.

    ``weighted``: weight by ``rho`` (at ``level``, capped at ``cap`` when set);
    ``mask``: drop tokens or sequences whose ratio is outside ``[mask_min,
    mask_max]``. Fields: ``importance_weight`` (the factor on each token's loss:
    the weight, or 1, times 0 where masked), ``importance_truncated`` (with a
    cap: kept tokens whose weight was capped), ``importance_masked`` (with a
    mask: tokens dropped).
    """

    weighted: bool = False
    level: Level = "token"
    cap: float | None = None
    mask: Level | None = None
    mask_min: float = 0.5
    mask_max: float = 2.0

    @property
    def metrics(self) -> dict[str, Metric]:
        """The loss's metrics of the corrections that are on: means over the loss tokens."""
        return {name: Metric(_PARTS[name][0], per="num_tokens") for name in self._logged()}

    def _logged(self) -> list[str]:
        on = {
            "is_weight_mean": self.weighted,
            "is_truncated_fraction": self.weighted and self.cap is not None,
            "is_masked_fraction": self.mask is not None,
        }
        return [name for name, enabled in on.items() if enabled]

    def fields(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The fields for a ``[B, L]`` batch of whole sequences (``loss_mask``, ``prev_logprobs``, ``generation_logprobs``).

        Computed in float64: a sequence's summed log-ratio can exceed what
        float32's exp holds before the cap brings it back.
        """
        mask = batch["loss_mask"].bool()
        log_rho = torch.where(mask, batch["prev_logprobs"].double() - batch["generation_logprobs"].double(), 0.0)
        kept = mask if self.mask is None else mask & self._within_bounds(log_rho, mask)
        weight = torch.ones_like(log_rho)
        fields = {}
        if self.weighted:
            weight = torch.exp(log_rho.sum(1, keepdim=True).expand_as(log_rho) if self.level == "sequence" else log_rho)
            if self.cap is not None:
                fields["importance_truncated"] = kept & (weight > self.cap)
                weight = weight.clamp(max=self.cap)
        if self.mask is not None:
            fields["importance_masked"] = mask & ~kept
        fields["importance_weight"] = (weight * kept).float()
        return fields

    def _within_bounds(self, log_rho: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Where the token's ratio, or its sequence's geometric mean (over its loss tokens), is within the bounds."""
        if self.mask == "sequence":
            lengths = mask.sum(1, keepdim=True).clamp(min=1)
            log_rho = (log_rho.sum(1, keepdim=True) / lengths).expand_as(log_rho)
        rho = torch.exp(log_rho)
        return (rho >= self.mask_min) & (rho <= self.mask_max)

    def parts(self, batch: Mapping[str, torch.Tensor], mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The metric parts of a micro-batch (fields aligned to predictions, ``mask`` its ``token_mask``)."""
        return {
            part: (batch[field].to(mask.device).float() * mask).sum().detach()
            for part, field in (_PARTS[name] for name in self._logged())
        }


def importance_correction(cfg: ClippedPGLossConfig) -> ImportanceCorrection | None:
    """The corrections ``loss_fn`` turns on, or None when it turns none on (the loss is then today's)."""
    if not cfg.use_importance_sampling_correction and cfg.importance_sampling_mask is None:
        return None
    return ImportanceCorrection(
        weighted=cfg.use_importance_sampling_correction,
        level=cfg.importance_sampling_level,
        cap=cfg.truncated_importance_sampling_ratio,
        mask=cfg.importance_sampling_mask,
        mask_min=cfg.importance_sampling_mask_min,
        mask_max=cfg.importance_sampling_mask_max,
    )


def sequence_ids(loss_mask: torch.Tensor) -> torch.Tensor:
    """The ``sequence_id`` field of a ``[B, L]`` batch: each token's row.

    Unique within every micro-batch the batch is split or packed into, which is
    all GSPO's per-sequence sums need: a packed row holds several rows' tokens,
    and a context-parallel rank pieces of each.
    """
    rows, length = loss_mask.shape
    return torch.arange(rows, dtype=torch.int32)[:, None].expand(rows, length).contiguous()
