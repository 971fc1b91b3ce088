"""Sequence packing: several samples in one row, each attending only to itself.

Padding every sample of a batch to the longest one wastes most of the compute
when lengths vary (long-context data always does). Packing places samples end
to end in rows of a fixed capacity (first-fit decreasing) and records where
each one starts (``cu_seqlens``), which the attention (``thd`` format) and
megatron's RoPE use to keep samples apart and restart positions at 0. Each
sample is padded to ``multiple`` tokens (context parallelism splits every
sample into ``2 CP`` chunks); the rest of a row is one padding segment.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nemo_rl.data.token_alignment import token_fields


@dataclass(frozen=True)
class PackingStats:
    rows: int
    real_tokens: int
    allocated_tokens: int

    @property
    def efficiency(self) -> float:
        """Tokens used / tokens allocated: what padding wastes (1.0 = nothing)."""
        return self.real_tokens / self.allocated_tokens if self.allocated_tokens else 0.0


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def pack_capacity(max_total_sequence_length: int, multiple: int) -> int:
    """The row length: the longest allowed sample, rounded up so it splits as the layout needs."""
    return _round_up(max_total_sequence_length, multiple)


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of sample indices whose lengths sum to at most ``capacity`` (longest samples placed first)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[index] > capacity:
            raise ValueError(f"a sample of {lengths[index]} tokens does not fit a packed row of {capacity}")
        for b, free in enumerate(room):
            if lengths[index] <= free:
                bins[b].append(index)
                room[b] -= lengths[index]
                break
        else:
            bins.append([index])
            room.append(capacity - lengths[index])
    return bins


def pack_batch(
    batch: dict[str, torch.Tensor], capacity: int, multiple: int, pad_id: int = 0
) -> tuple[list[dict[str, torch.Tensor]], PackingStats]:
    """Pack a collated batch (``input_ids``, ``loss_mask``, ``input_lengths``) into rows of ``capacity`` tokens.

    Each row is a dict with ``input_ids``, ``loss_mask``, ``position_ids`` and
    every other per-token field of the batch (``generation_logprobs``, ...) of
    shape ``[1, capacity, ...]``, and ``cu_seqlens`` (int32, the padded segment
    boundaries, ending with the row's padding segment). A sample's first token
    gets loss mask 0: it is never predicted (nothing precedes it in its sample),
    and in a packed row the shift to next-token targets would otherwise pair it
    with the previous sample's last token.
    """
    lengths = batch["input_lengths"].tolist()
    padded = [_round_up(n, multiple) for n in lengths]
    fields = [k for k in token_fields(batch) if k != "loss_mask"]
    rows = []
    for members in first_fit_decreasing(padded, capacity):
        row = {k: torch.zeros((1, capacity, *batch[k].shape[2:]), dtype=batch[k].dtype) for k in fields}
        input_ids = torch.full((1, capacity), pad_id, dtype=batch["input_ids"].dtype)
        loss_mask = torch.zeros((1, capacity), dtype=batch["loss_mask"].dtype)
        position_ids = torch.zeros((1, capacity), dtype=torch.long)
        bounds, offset = [0], 0
        for index in sorted(members):
            n = lengths[index]
            input_ids[0, offset : offset + n] = batch["input_ids"][index, :n]
            for k in fields:
                row[k][0, offset : offset + n] = batch[k][index, :n]
            loss_mask[0, offset + 1 : offset + n] = batch["loss_mask"][index, 1:n]
            position_ids[0, offset : offset + padded[index]] = torch.arange(padded[index])
            offset += padded[index]
            bounds.append(offset)
        if offset < capacity:
            position_ids[0, offset:] = torch.arange(capacity - offset)
            bounds.append(capacity)
        rows.append(
            row
            | {
                "input_ids": input_ids,
                "loss_mask": loss_mask,
                "position_ids": position_ids,
                "cu_seqlens": torch.tensor(bounds, dtype=torch.int32),
            }
        )
    return rows, PackingStats(len(rows), sum(lengths), len(rows) * capacity)
