"""Sequence packing and the context-parallel split of packed rows."""

from __future__ import annotations

import pytest
import torch

from nemo_rl.data.packing import first_fit_decreasing, pack_batch, pack_capacity
from nemo_rl.models.megatron.context_parallel import cp_token_indices, split_for_context_parallel


def _batch(lengths, width=16):
    input_ids = torch.zeros((len(lengths), width), dtype=torch.long)
    loss_mask = torch.zeros_like(input_ids)
    for row, n in enumerate(lengths):
        input_ids[row, :n] = torch.arange(1, n + 1) + 100 * row
        loss_mask[row, :n] = 1
    return {"input_ids": input_ids, "loss_mask": loss_mask, "input_lengths": torch.tensor(lengths)}


def test_first_fit_decreasing_fills_rows_and_refuses_oversized_samples():
    assert first_fit_decreasing([5, 9, 3, 7, 2], 10) == [[1], [3, 2], [0, 4]]
    with pytest.raises(ValueError, match="a sample of 11 tokens does not fit a packed row of 10"):
        first_fit_decreasing([11], 10)


def test_rows_keep_samples_apart_restart_positions_and_report_efficiency():
    rows, stats = pack_batch(_batch([5, 3, 7]), capacity=pack_capacity(15, 4), multiple=4)
    assert pack_capacity(15, 4) == 16
    assert [row["cu_seqlens"].tolist() for row in rows] == [[0, 8, 16], [0, 4, 16]]  # padding is its own segment
    first = rows[0]
    assert first["input_ids"][0].tolist() == [1, 2, 3, 4, 5, 0, 0, 0, 201, 202, 203, 204, 205, 206, 207, 0]
    assert first["position_ids"][0].tolist() == [*range(8), *range(8)]
    # a sample's first token is never a target, so the shift cannot pair it with the previous sample
    assert first["loss_mask"][0].tolist() == [0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0]
    assert rows[1]["input_ids"][0, :4].tolist() == [101, 102, 103, 0]
    assert stats.rows == 2 and stats.real_tokens == 15 and stats.allocated_tokens == 32
    assert stats.efficiency == pytest.approx(15 / 32)


def test_context_parallel_ranks_hold_balanced_chunks_that_cover_each_sample_once():
    cu_seqlens = torch.tensor([0, 8, 16], dtype=torch.int32)
    rank0, rank1 = (cp_token_indices(cu_seqlens, 2, r).tolist() for r in (0, 1))
    assert rank0 == [0, 1, 6, 7, 8, 9, 14, 15]  # chunks 0 and 3 of each sample
    assert rank1 == [2, 3, 4, 5, 10, 11, 12, 13]  # chunks 1 and 2
    tokens = {"input_ids": torch.arange(16)[None]}
    assert split_for_context_parallel(tokens, cu_seqlens, 2, 1)["input_ids"].tolist() == [rank1]
    with pytest.raises(ValueError, match="does not split into 2 x context_parallel_size = 4 chunks"):
        cp_token_indices(torch.tensor([0, 6], dtype=torch.int32), 2, 0)
