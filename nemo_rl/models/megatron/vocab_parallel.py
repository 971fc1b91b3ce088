"""Full-vocabulary quantities from vocab-parallel logits, without gathering them.

Megatron's GPTModel (``labels=None``) gives each tensor-parallel rank r its slice
of the logits, vocab ids ``[r V / tp, (r + 1) V / tp)``. Gathering the full
``[B, L, V]`` logits would cost tp times the memory of the largest activation in
the model, so the log-normaliser, the top-k and the log-probs at given ids are
computed shard by shard and combined with small ``[B, L]`` / ``[B, L, k]``
collectives. ``group=None`` (or a group of one rank) means the logits are the
whole vocabulary and nothing is communicated.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.distributed as dist


def _tp_size(group: Any) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _tp_rank(group: Any) -> int:
    return 0 if group is None else dist.get_rank(group)


class _SumOverShards(torch.autograd.Function):
    """All-reduce (sum) whose backward passes the gradient through unchanged.

    Everything after the sum (the loss) is computed identically on every TP
    rank, so the gradient of the one loss w.r.t. a rank's contribution is the
    output's gradient itself. ``torch.distributed.nn.functional.all_reduce``
    all-reduces the gradient too, which would scale every shard's gradient by
    the TP size (megatron's ``reduce_from_tensor_model_parallel_region`` has
    the same semantics as this, but reduces in place).
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def _sum_over_shards(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    return tensor if _tp_size(group) == 1 else _SumOverShards.apply(tensor, group)


def _gather_last_dim(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """Every rank's tensor concatenated along the last dimension, in rank order (no grad)."""
    if _tp_size(group) == 1:
        return tensor
    pieces = [torch.empty_like(tensor) for _ in range(_tp_size(group))]
    dist.all_gather(pieces, tensor.contiguous(), group=group)
    return torch.cat(pieces, dim=-1)


def vocab_parallel_log_normalizer(logits_local: torch.Tensor, group: Any) -> torch.Tensor:
    """``logsumexp`` over the full vocabulary ``[B, L]``, differentiable w.r.t. every rank's shard.

    The max only stabilises the exponentials and cancels out of the result, so
    it is reduced detached; the sum of exponentials carries the gradient.
    """
    logits = logits_local.float()
    if _tp_size(group) == 1:
        return torch.logsumexp(logits, dim=-1)
    shift = logits.detach().amax(dim=-1)
    dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=group)
    local_sum = torch.exp(logits - shift.unsqueeze(-1)).sum(dim=-1)
    return shift + torch.log(_sum_over_shards(local_sum, group))


@torch.no_grad()
def topk_logprobs(logits_local: torch.Tensor, k: int, group: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k log-probs over the full vocabulary and their global vocab ids, each ``[B, L, k]``.

    The global top-k is among the union of the ranks' local top-k, so only
    ``tp * k`` candidates per position are exchanged, never the logits.
    """
    logits = logits_local.float()
    vocab_local = logits.shape[-1]
    log_normalizer = vocab_parallel_log_normalizer(logits, group)
    values, indices = logits.topk(min(k, vocab_local), dim=-1)
    values = _gather_last_dim(values - log_normalizer.unsqueeze(-1), group)
    indices = _gather_last_dim(indices + _tp_rank(group) * vocab_local, group)
    values, picked = values.topk(min(k, values.shape[-1]), dim=-1)
    return values, indices.gather(-1, picked)


def logprobs_at(logits_local: torch.Tensor, indices: torch.Tensor, group: Any) -> torch.Tensor:
    """Log-probs ``[B, L, k]`` at global vocab ids ``indices``, differentiable w.r.t. every rank's shard.

    Each id's logit lives on exactly one rank; the others contribute zero to the sum.
    """
    logits = logits_local.float()
    vocab_local = logits.shape[-1]
    local_ids = indices.to(logits.device) - _tp_rank(group) * vocab_local
    owned = (local_ids >= 0) & (local_ids < vocab_local)
    picked = logits.gather(-1, local_ids.clamp(0, vocab_local - 1))
    picked = _sum_over_shards(torch.where(owned, picked, torch.zeros_like(picked)), group)
    return picked - vocab_parallel_log_normalizer(logits, group).unsqueeze(-1)


def megatron_tp_group() -> Any:
    """Megatron's TP group when it splits the vocabulary, else None.

    Looked up in ``sys.modules`` rather than imported: model parallelism cannot
    be initialised without megatron having been imported, and importing it
    costs seconds in processes (drivers, tests) that never use it.
    """
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is None or not parallel_state.model_parallel_is_initialized():
        return None
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return None
    return parallel_state.get_tensor_model_parallel_group()
