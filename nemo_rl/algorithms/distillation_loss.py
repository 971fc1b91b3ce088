"""On-policy distillation: a KL between the student and a teacher summarised by its top-k log-probs.

The student's model output is its *local* vocab-parallel logits ``[B, L, V / tp]``;
every full-vocabulary quantity is computed shard by shard
(``nemo_rl.models.megatron.vocab_parallel``).

The loss follows ``loss_functions``' contract: called as ``loss(logits, batch)``
inside the worker, it returns ``(numerator, count, metrics)`` with per-token
fields already aligned to prediction positions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from nemo_rl.models.megatron.vocab_parallel import logprobs_at, megatron_tp_group
from nemo_rl.models.policy.interfaces import Metric, ModelOutput


@dataclass(frozen=True)
class DistillationLoss:
    """KL between teacher and student at every masked position, restricted to the teacher's top-k ids.

    Per position, over the teacher's top-k set S (as NeMo RL does):
    forward ``sum_{i in S} p_t(i) (log p_t(i) - log p_s(i))``, reverse
    ``sum_{i in S} p_s(i) (log p_s(i) - log p_t(i))``, mixed
    ``w forward + (1 - w) reverse``. Neither distribution is renormalised
    over S, so with k = V it is the exact KL; with small k it is the part of
    the KL where the teacher puts its mass, at a fraction of the cost of
    shipping the teacher's full distribution.

    Batch fields (aligned by the worker): ``token_mask`` ``[B, L]``,
    ``teacher_topk_logprobs`` ``[B, L, k]``, ``teacher_topk_indices``
    ``[B, L, k]`` (int64 global vocab ids). ``group`` overrides the TP group
    the logits are split over; None means megatron's, if it splits the vocab.
    """

    # The worker passes this loss its local vocab-parallel logits instead of token log-probs.
    model_output: ClassVar[ModelOutput] = "logits"
    # The loss is the KL itself; both names are logged.
    metrics: ClassVar[Mapping[str, Metric]] = {
        "kl": Metric("kl_sum", per="num_tokens"),
        "loss": Metric("kl_sum", per="num_tokens"),
    }

    kl_type: Literal["forward", "reverse", "mixed"] = "forward"
    mixed_kl_weight: float = 0.5
    group: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.kl_type not in ("forward", "reverse", "mixed"):
            raise ValueError(f"kl_type must be 'forward', 'reverse' or 'mixed', got {self.kl_type!r}")

    def __call__(
        self, logits_local: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        device = logits_local.device
        group = self.group if self.group is not None else megatron_tp_group()
        mask = batch["token_mask"].to(device).bool()
        # Padding positions may hold -inf or nan teacher log-probs, which would make even a masked-out
        # KL's gradient nan; replace them before any arithmetic and select (not multiply) afterwards.
        teacher = torch.where(mask.unsqueeze(-1), batch["teacher_topk_logprobs"].to(device).float(), 0.0)
        student = logprobs_at(logits_local, batch["teacher_topk_indices"].to(device).long(), group)
        kl = torch.where(mask, self._per_position_kl(student, teacher), 0.0)
        numerator = kl.sum()
        num_tokens = mask.sum().to(torch.int)
        return numerator, num_tokens, {"kl_sum": numerator.detach(), "num_tokens": num_tokens.detach()}

    def _per_position_kl(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        forward = (teacher.exp() * (teacher - student)).sum(-1)
        reverse = (student.exp() * (student - teacher)).sum(-1)
        if self.kl_type == "forward":
            return forward
        if self.kl_type == "reverse":
            return reverse
        return self.mixed_kl_weight * forward + (1 - self.mixed_kl_weight) * reverse
