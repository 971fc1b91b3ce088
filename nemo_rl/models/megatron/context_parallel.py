"""Context parallelism's split of packed sequences, and the collective its attention needs.

Causal attention makes late tokens more expensive than early ones, so
megatron-core splits every sample into ``2 CP`` equal chunks and gives rank
``r`` chunks ``r`` and ``2 CP - 1 - r`` (one cheap, one expensive). Its RoPE for
packed sequences assumes exactly this layout, so the batch split here, the
attention in ``attention.py`` and megatron's rotary embedding agree on which
token sits where.
"""

from __future__ import annotations

import torch


def cp_token_indices(cu_seqlens: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Positions in the packed sequence held by ``cp_rank``, in the order that rank holds them."""
    cu_seqlens = cu_seqlens.to("cpu", torch.long)
    lengths = cu_seqlens.diff()
    uneven = lengths % (2 * cp_size) != 0
    if uneven.any():
        raise ValueError(
            f"a packed sample of {int(lengths[uneven][0])} tokens does not split into 2 x context_parallel_size = "
            f"{2 * cp_size} chunks; samples must be padded to a multiple of it when packed"
        )
    chunk = lengths // (2 * cp_size)
    # per sample, chunk cp_rank then chunk 2 CP - 1 - cp_rank: each a run of `chunk` consecutive positions
    firsts = torch.stack([cu_seqlens[:-1] + j * chunk for j in (cp_rank, 2 * cp_size - 1 - cp_rank)], 1).flatten()
    runs = chunk.repeat_interleave(2)
    run = torch.repeat_interleave(torch.arange(runs.numel()), runs)
    return firsts[run] + torch.arange(run.numel()) - (runs.cumsum(0) - runs)[run]


def single_sample_rows(input_ids: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Each row of ``[B, L]`` as its own one-sample packed micro-batch (``cu_seqlens = [0, L]``).

    Context parallelism runs through megatron's packed path, which needs sample
    boundaries; an unpacked batch is given them this way.
    """
    bounds = torch.tensor([0, input_ids.shape[1]], dtype=torch.int32)
    return [{"input_ids": input_ids[i : i + 1], "cu_seqlens": bounds} for i in range(input_ids.shape[0])]


def split_for_context_parallel(
    tensors: dict[str, torch.Tensor], cu_seqlens: torch.Tensor, cp_size: int, cp_rank: int
) -> dict[str, torch.Tensor]:
    """This rank's share of packed per-token ``[1, T]`` tensors."""
    index = cp_token_indices(cu_seqlens, cp_size, cp_rank)
    return {k: v.index_select(1, index.to(v.device)) for k, v in tensors.items()}


def gather_context_parallel(local: torch.Tensor, cu_seqlens: torch.Tensor, group) -> torch.Tensor:
    """Inverse of ``split_for_context_parallel`` for a ``[B, T / CP, ...]`` output: every rank's chunks, in order."""
    pieces = [torch.empty_like(local) for _ in range(group.size())]
    torch.distributed.all_gather(pieces, local.contiguous(), group=group)
    full = torch.empty((local.shape[0], int(cu_seqlens[-1]), *local.shape[2:]), dtype=local.dtype, device=local.device)
    for rank, piece in enumerate(pieces):
        full[:, cp_token_indices(cu_seqlens, group.size(), rank).to(local.device)] = piece
    return full


class _AllGather(torch.autograd.Function):
    """all_gather whose backward sums the gathered gradients and keeps this rank's part.

    torch.distributed.nn's all_gather uses reduce_scatter / all_to_all in its
    backward, which gloo lacks; all_reduce then slice computes the same on every backend.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> tuple[torch.Tensor, ...]:
        ctx.group = group
        ctx.rank = group.rank()
        gathered = [torch.empty_like(tensor) for _ in range(group.size())]
        torch.distributed.all_gather(gathered, tensor.contiguous(), group=group)
        return tuple(gathered)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        stacked = torch.stack([g.contiguous() for g in grads])
        torch.distributed.all_reduce(stacked, group=ctx.group)
        return stacked[ctx.rank], None


def all_gather_with_grad(tensor: torch.Tensor, group) -> tuple[torch.Tensor, ...]:
    return _AllGather.apply(tensor, group)
