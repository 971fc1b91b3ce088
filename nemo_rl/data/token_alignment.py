"""Per-token fields of a batch, moved to the positions that predict their tokens.

Workers hand a loss the log-probability of every position's next token
(``token_logprobs[:, t] = log p(x[t+1] | x[:t+1])``), so every per-token field
(``loss_mask``, ``generation_logprobs``, ``advantages``, ...: indexed by the token it
describes) must be shifted by one the same way. It belongs with the data because
packing and context parallelism must know which fields are per token: the shift
has to happen on the whole sequence, before a rank takes its pieces of it.
"""

from __future__ import annotations

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
    """Names of the per-token fields of a batch (``[B, L, ...]`` like ``input_ids``, not model inputs)."""
    shape = batch["input_ids"].shape
    return [
        k
        for k, v in batch.items()
        if k not in _MODEL_INPUTS and torch.is_tensor(v) and v.dim() >= 2 and v.shape[:2] == shape
    ]


def align_to_predictions(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every per-token field moved to the position that predicts its token; ``loss_mask`` becomes ``token_mask``."""
    aligned = {("token_mask" if k == "loss_mask" else k): _shift(batch[k]) for k in token_fields(batch)}
    if "token_mask" in aligned:
        aligned["token_mask"] = aligned["token_mask"].float()
    return aligned
