"""DAPO's soft overlong punishment (arXiv 2503.14476, section 3.4, eq. 13), added to the rewards before advantages.

A response cut at the length limit is scored on an answer it never finished,
so its reward is noise; punishing every cut response equally is noise too (a
sound but long reasoning is punished like a rambling one). DAPO penalises
length gradually over the last ``overlong_buffer_length`` tokens before the
maximum ``Lmax`` (``max_response_length``, by default
``policy.generation.max_new_tokens``): with ``B`` the buffer and ``P`` the
penalty, a response of ``L`` tokens gets

    0                              if L <= Lmax - B
    -(L - (Lmax - B)) / B * P      if Lmax - B < L <= Lmax   (reaching -P at Lmax)
    -P                             if L > Lmax

(eq. 13 with P = 1). The environment's own reward is what ``reward_mean``
keeps logging; the shaped rewards and the penalties are logged under
``reward_shaping/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nemo_rl.config.schema import RewardShapingConfig


@dataclass(frozen=True)
class OverlongShaping:
    max_response_length: int  # Lmax
    buffer_length: int  # B
    penalty: float  # P

    @classmethod
    def of(cls, cfg: RewardShapingConfig, max_new_tokens: int) -> OverlongShaping | None:
        """The run's shaping (a validated config), or None when ``grpo.reward_shaping.enabled`` is off."""
        if not cfg.enabled:
            return None
        assert cfg.overlong_buffer_length is not None  # the config's rule requires it when enabled
        return cls(cfg.max_response_length or max_new_tokens, cfg.overlong_buffer_length, cfg.overlong_buffer_penalty)

    def penalties(self, lengths: Sequence[int]) -> torch.Tensor:
        """Each response's penalty (<= 0) from its length in tokens."""
        excess = torch.tensor(lengths, dtype=torch.float32) - (self.max_response_length - self.buffer_length)
        return -self.penalty * (excess.clamp(min=0) / self.buffer_length).clamp(max=1)


def shaping_metrics(environment_rewards: torch.Tensor, penalties: torch.Tensor) -> dict[str, float]:
    """The penalties' mean, the share of responses penalised, and the mean reward the advantages saw."""
    return {
        "reward_shaping/penalty_mean": float(penalties.mean()),
        "reward_shaping/penalized_fraction": float((penalties < 0).float().mean()),
        "reward_shaping/reward_mean": float((environment_rewards + penalties).mean()),
    }
