"""GRPO's group-relative advantages and the per-token averaging weights of its loss.

GRPO samples several responses per prompt and scores each against the others
from the same prompt, so no value network is needed: the advantage of a
response is its reward minus the group's mean, optionally divided by the
group's standard deviation (which makes every prompt count equally, whatever
its reward scale; without it, prompts with spread-out rewards weigh more).
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, normalize_std: bool = True, eps: float = 1e-6):
    """Per-response advantages for rewards laid out as consecutive groups of ``group_size``.

    A group whose responses all scored the same gets advantage 0 (it carries no
    signal about which response is better), also with std normalisation.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of {group_size} entries, got {tuple(rewards.shape)}")
    grouped = rewards.float().view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if normalize_std:
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped[:, :1])
        centred = torch.where(std > eps, centred / (std + eps), torch.zeros_like(centred))
    return centred.view(-1)


def token_weights(loss_mask: torch.Tensor, sequence_level: bool) -> torch.Tensor:
    """The ``token_weight`` field of ``ClippedPGLoss`` for a global batch ([B, L] mask of loss tokens).

    Token level: every loss token weighs 1 (long responses weigh more).
    Sequence level: ``T / (N n_i)``, so that dividing the weighted sum by the
    global token count T gives the mean over sequences of each one's token mean.
    """
    mask = loss_mask.float()
    if not sequence_level:
        return mask.clone()
    per_sequence = mask.sum(dim=1, keepdim=True)
    sequences = (per_sequence > 0).sum()
    return torch.where(per_sequence > 0, mask.sum() / (sequences * per_sequence.clamp(min=1)), 0.0) * mask
