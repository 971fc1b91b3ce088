"""Micro-batches (``nemo_rl.models.policy.micro_batches``), fixed-size and token-budget: groupings checked by hand."""

from __future__ import annotations

import pytest
import torch

from nemo_rl.models.policy.micro_batches import (
    MICRO_BATCHES,
    UTILISATION,
    budget_groups,
    budget_metrics,
    pad_positions,
    padded_length,
    split_by_budget,
    split_fixed,
)


def _lengths_batch(lengths: list[int], width: int) -> dict[str, torch.Tensor]:
    real = torch.arange(width) < torch.tensor(lengths)[:, None]
    ids = torch.where(real, torch.arange(1, width + 1).expand(len(lengths), -1), 0)
    return {"input_ids": ids, "loss_mask": real.long(), "input_lengths": torch.tensor(lengths), "row": torch.arange(4)}


def test_fixed_micro_batches_keep_row_order_and_are_trimmed_to_their_longest_row():
    batch = _lengths_batch([5, 30, 9, 12], 32)
    split = split_fixed(batch, 2, 8)
    # rows 0-1 reach 30 (rounded to 32); rows 2-3 reach 12 (rounded to 16)
    assert [tuple(mb["input_ids"].shape) for mb in split.micro_batches] == [(2, 32), (2, 16)]
    assert [mb["row"].tolist() for mb in split.micro_batches] == [[0, 1], [2, 3]]
    assert torch.equal(split.micro_batches[1]["loss_mask"], batch["loss_mask"][2:, :16])
    assert split.real_tokens == [35, 21]
    # outputs of the trimmed micro-batches come back at the batch's width, in row order
    outputs = torch.cat([pad_positions(mb["input_ids"].float(), 32) for mb in split.micro_batches])
    assert torch.equal(split.restore(outputs), batch["input_ids"].float() * batch["loss_mask"])


def test_fixed_micro_batches_untrimmed_without_lengths_or_a_multiple():
    batch = _lengths_batch([5, 30, 9, 12], 32)
    assert {tuple(mb["input_ids"].shape) for mb in split_fixed(batch, 2, None).micro_batches} == {(2, 32)}
    no_lengths = {k: v for k, v in batch.items() if k != "input_lengths"}
    assert {tuple(mb["input_ids"].shape) for mb in split_fixed(no_lengths, 2, 8).micro_batches} == {(2, 32)}
    assert [mb["input_ids"].shape[0] for mb in split_fixed(batch, 8, 8).micro_batches] == [4]  # fewer rows: one
    seven_rows = {k: torch.cat([v, v[:3]]) for k, v in batch.items()}
    with pytest.raises(ValueError, match="7 rows does not split into 3 equal parts"):
        split_fixed(seven_rows, 2, 8)


def test_padded_length_rounds_up_but_never_past_the_batch():
    assert padded_length(33, 16, 64) == 48
    assert padded_length(48, 16, 64) == 48
    assert padded_length(60, 16, 56) == 56  # 64 would need padding the batch does not hold
    assert padded_length(0, 8, 64) == 8  # an empty row still takes one rounded length


def test_longest_first_each_micro_batch_as_many_rows_as_fit():
    lengths = [10, 30, 20, 5, 30, 12]
    # Longest first, ties in row order: 1 (30), 4 (30), 2 (20), 5 (12), 0 (10), 3 (5). Round 8, budget 64:
    # [1, 4] at 32 is 64, full; [2, 5] at 24 is 48 (with 0: 72); [0, 3] at 16 is 32.
    assert budget_groups(lengths, 64, 8, 32) == [[1, 4], [2, 5], [0, 3]]
    # Budget 100: [1, 4, 2] at 32 is 96; [5, 0, 3] at 16 is 48.
    assert budget_groups(lengths, 100, 8, 32) == [[1, 4, 2], [5, 0, 3]]
    # Round 1, budget 180: all six at 30.
    assert budget_groups(lengths, 180, 1, 32) == [[1, 4, 2, 5, 0, 3]]


def test_pairs_move_together_sorted_by_their_longer_row():
    lengths = [10, 40, 8, 6, 30, 30]  # pairs (0, 1): 40, (2, 3): 8, (4, 5): 30
    # Round 8: pair (0, 1) at 40 is 80, with (4, 5) 160; (4, 5) at 32 is 64, with (2, 3) 128.
    assert budget_groups(lengths, 100, 8, 40, rows_per_unit=2) == [[0, 1], [4, 5], [2, 3]]
    assert budget_groups(lengths, 128, 8, 40, rows_per_unit=2) == [[0, 1], [4, 5, 2, 3]]
    with pytest.raises(ValueError, match="do not split into units of 2"):
        budget_groups(lengths[:5], 128, 8, 40, rows_per_unit=2)


def test_a_unit_longer_than_the_budget_is_refused():
    with pytest.raises(ValueError, match=r"2 row\(s\) of 40 padded tokens need 80 tokens, more than the micro-batch"):
        budget_groups([40, 10], 64, 8, 40, rows_per_unit=2)


def _shard() -> dict[str, torch.Tensor]:
    """Four rows of lengths 3, 7, 2, 5 padded to 8, with a per-token, a per-row and a [B, L, 2] field."""
    lengths = torch.tensor([3, 7, 2, 5])
    positions = torch.arange(8)
    input_ids = torch.where(positions < lengths[:, None], 100 * torch.arange(1, 5)[:, None] + positions, 0)
    return {
        "input_ids": input_ids,
        "loss_mask": (positions < lengths[:, None]).long(),
        "input_lengths": lengths,
        "pairs": torch.stack([input_ids, -input_ids], dim=-1),
    }


def test_split_trims_each_micro_batch_to_its_longest_row():
    shard = _shard()
    # Longest first: 1 (7), 3 (5), 0 (3), 2 (2); round 2, budget 12: [1] at 8 (with 3: 16); [3, 0] at 6; [2] joins
    # at 6 x 3 = 18 > 12, so alone at 2.
    split = split_by_budget(shard, budget=12, multiple=2)
    assert [mb["input_ids"].shape for mb in split.micro_batches] == [(1, 8), (2, 6), (1, 2)]
    assert split.rows.tolist() == [1, 3, 0, 2] and split.width == 8
    assert split.real_tokens == [7, 8, 2]
    middle = split.micro_batches[1]
    torch.testing.assert_close(middle["input_ids"], shard["input_ids"][[3, 0], :6], rtol=0, atol=0)
    torch.testing.assert_close(middle["loss_mask"], shard["loss_mask"][[3, 0], :6], rtol=0, atol=0)
    torch.testing.assert_close(middle["pairs"], shard["pairs"][[3, 0], :6], rtol=0, atol=0)
    assert middle["input_lengths"].tolist() == [5, 3]  # per-row fields follow their rows, untrimmed


def test_restore_puts_outputs_back_in_row_order_at_the_shard_length():
    shard = _shard()
    split = split_by_budget(shard, budget=12, multiple=2)
    # What a worker returns: each micro-batch's output (here its input ids + 0.5), zero-padded to the widest.
    outputs = torch.cat([pad_positions(mb["input_ids"] + 0.5, 8) for mb in split.micro_batches])
    restored = split.restore(outputs)
    assert restored.shape == (4, 8)
    for row, length in enumerate(shard["input_lengths"].tolist()):
        torch.testing.assert_close(restored[row, :length], shard["input_ids"][row, :length] + 0.5, rtol=0, atol=0)
    assert (restored[2, 2:] == 0).all()  # row 2's micro-batch was 2 long: zeros beyond, where only padding lies
    values, indices = split.restore((outputs, outputs.long()))
    torch.testing.assert_close(values, restored, rtol=0, atol=0)
    assert indices.dtype == torch.long and indices.shape == (4, 8)


def test_pad_positions_keeps_trailing_dimensions():
    out = pad_positions(torch.ones(2, 3, 4), 5)
    assert out.shape == (2, 5, 4) and out[:, :3].eq(1).all() and out[:, 3:].eq(0).all()
    same = torch.ones(2, 5)
    assert pad_positions(same, 5) is same


def test_metrics_average_utilisation_over_every_shards_micro_batches():
    split = split_by_budget(_shard(), budget=12, multiple=2)  # real tokens 7, 8, 2 of 12
    other = split_by_budget(_shard(), budget=12, multiple=2)
    metrics = budget_metrics([split, other], 12)
    assert metrics[MICRO_BATCHES] == 6.0
    assert metrics[UTILISATION] == pytest.approx((7 + 8 + 2) / (3 * 12))
