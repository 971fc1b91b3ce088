"""A data-parallel shard's micro-batches, each trimmed to its own longest row: fixed-size, or as many rows as fit
a budget of tokens (NeMo RL's ``dynamic_batching``).

A batch is padded to its longest row, so a fixed micro-batch of shorter rows
spends compute on padding unless it is trimmed (``split_fixed``). Beyond that,
a fixed micro-batch size has to be small enough for the longest rows a run
can see, so micro-batches of short rows use a fraction of the memory, and every
row is padded to the batch's longest, so most of their compute goes to
padding. Here each data-parallel shard's rows are sorted longest first and cut
into runs whose padded size (rows x the run's longest row, rounded up to
``multiple``) stays within the budget, and each micro-batch is trimmed to its
own longest row: short rows travel many at a time, with little padding.

The step does not change: a loss returns sums and a count (the per-token
convention of ``nemo_rl.algorithms.loss_functions``) and megatron divides the
numerators summed over every micro-batch by the summed counts, so any grouping
of the rows gives the same gradients. Forward outputs are put back in the
shard's row order at its padded length (``MicroBatchSplit.restore``), zero
beyond a micro-batch's width, where only padding lies.

Rows that must stay together (a preference pair, chosen then rejected, which a
pairwise loss compares within one micro-batch) move as one unit of
``rows_per_unit`` rows, sorted by its longest row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import overload

import torch

Batch = dict[str, torch.Tensor]
Output = torch.Tensor | tuple[torch.Tensor, ...]

# Logged with a training step's metrics when token-budget batching is on.
UTILISATION = "dynamic_batching/utilisation"  # real tokens / budget, averaged over the step's micro-batches
MICRO_BATCHES = "dynamic_batching/micro_batches"  # the step's micro-batches, summed over data-parallel ranks


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def padded_length(longest: int, multiple: int, width: int) -> int:
    """A micro-batch's length: its longest row rounded up to ``multiple``, but never beyond the batch's ``width``.

    The batch's own padded length is already a valid length for the layout
    (``make_sequence_length_divisible_by`` is a multiple of what it needs), and
    trimming never has to add padding that the batch does not hold.
    """
    return min(_round_up(max(longest, 1), multiple), width)


def budget_groups(
    lengths: Sequence[int], budget: int, multiple: int, width: int, rows_per_unit: int = 1
) -> list[list[int]]:
    """The row indices of each micro-batch: units longest first, each micro-batch as many as fit the budget.

    A unit is ``rows_per_unit`` consecutive rows, as long as its longest one.
    Longest first, the first unit of a micro-batch fixes its padded length, so
    the next unit joins while (rows + its rows) x that length is within
    ``budget``. Ties keep the shard's order, so the split is a function of the
    lengths alone. A unit too long for the budget on its own is refused: the
    config check (``policy.dynamic_batching``) keeps budgets above any row.
    """
    if len(lengths) % rows_per_unit:
        raise ValueError(f"{len(lengths)} rows do not split into units of {rows_per_unit}")
    units = range(len(lengths) // rows_per_unit)
    unit_rows = [list(range(u * rows_per_unit, (u + 1) * rows_per_unit)) for u in units]
    unit_length = [max(lengths[row] for row in rows) for rows in unit_rows]
    groups: list[list[int]] = []
    length = 0
    for unit in sorted(units, key=lambda u: (-unit_length[u], u)):
        if groups and (len(groups[-1]) + rows_per_unit) * length <= budget:
            groups[-1] += unit_rows[unit]
            continue
        length = padded_length(unit_length[unit], multiple, width)
        if rows_per_unit * length > budget:
            raise ValueError(
                f"{rows_per_unit} row(s) of {length} padded tokens need {rows_per_unit * length} tokens, more than "
                f"the micro-batch budget of {budget}"
            )
        groups.append(list(unit_rows[unit]))
    return groups


@dataclass(frozen=True)
class MicroBatchSplit:
    """One shard's micro-batches (token-budget or fixed-size), and how to put their outputs back in the shard's
    row order."""

    micro_batches: list[Batch]
    rows: torch.Tensor  # the shard's index of each row the micro-batches hold, in their order
    width: int  # the shard's padded length
    real_tokens: list[int]  # per micro-batch: its rows' own tokens (``input_lengths``)

    @overload
    def restore(self, output: torch.Tensor) -> torch.Tensor: ...
    @overload
    def restore(self, output: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]: ...
    def restore(self, output: Output) -> Output:
        """A worker's outputs (rows in micro-batch order, ``[R, W, ...]`` with W its widest micro-batch, zero
        beyond each one's width) as ``[R, width, ...]`` in the shard's row order; a tuple element-wise."""
        if isinstance(output, tuple):
            return tuple(self._restore(part) for part in output)
        return self._restore(output)

    def _restore(self, output: torch.Tensor) -> torch.Tensor:
        return pad_positions(output, self.width)[torch.argsort(self.rows)]


def pad_positions(output: torch.Tensor, width: int) -> torch.Tensor:
    """A ``[B, L, ...]`` output zero-padded to ``width`` positions (itself at that width)."""
    if output.shape[1] == width:
        return output
    padded = output.new_zeros((output.shape[0], width, *output.shape[2:]))
    padded[:, : output.shape[1]] = output
    return padded


def concat_rows(outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Micro-batches' ``[B_i, L_i, ...]`` outputs as one ``[sum B_i, max L_i, ...]``, each zero-padded to the widest."""
    width = max(output.shape[1] for output in outputs)
    return torch.cat([pad_positions(output, width) for output in outputs])


def split_by_budget(shard: Batch, budget: int, multiple: int, rows_per_unit: int = 1) -> MicroBatchSplit:
    """``shard`` (``input_ids``, ``input_lengths`` and any per-row or per-token fields) in token-budget
    micro-batches (``budget_groups``), each trimmed to its padded length."""
    width = shard["input_ids"].shape[1]
    lengths = shard["input_lengths"].tolist()
    groups = budget_groups(lengths, budget, multiple, width, rows_per_unit)
    micro_batches = [
        _rows_trimmed(shard, rows, padded_length(max(lengths[row] for row in rows), multiple, width)) for rows in groups
    ]
    real = [sum(lengths[row] for row in rows) for rows in groups]
    return MicroBatchSplit(micro_batches, torch.tensor([row for rows in groups for row in rows]), width, real)


def split_fixed(shard: Batch, micro_batch_size: int, multiple: int | None) -> MicroBatchSplit:
    """``shard`` in consecutive micro-batches of ``micro_batch_size`` rows (one if it holds fewer), each trimmed
    to its own longest row (``input_lengths``) rounded up to ``multiple``; ``multiple=None`` keeps the shard's
    width (pipeline stages exchange activations of one shape per schedule).

    The shard is padded to its longest row, so a micro-batch of shorter rows would otherwise spend its compute
    on padding: a GRPO step's micro-batches hold one prompt's group each, and the prompts' lengths differ.
    """
    rows = shard["input_ids"].shape[0]
    parts = max(rows // micro_batch_size, 1)
    if rows % parts:
        raise ValueError(f"batch of {rows} rows does not split into {parts} equal parts")
    size = rows // parts
    groups = [list(range(start, start + size)) for start in range(0, rows, size)]
    width = shard["input_ids"].shape[1]
    lengths = shard["input_lengths"].tolist() if "input_lengths" in shard else [width] * rows
    micro_batches = [
        _rows_trimmed(
            shard, group, width if multiple is None else padded_length(max(lengths[r] for r in group), multiple, width)
        )
        for group in groups
    ]
    real = [sum(lengths[row] for row in group) for group in groups]
    return MicroBatchSplit(micro_batches, torch.arange(rows), width, real)


def _rows_trimmed(shard: Batch, rows: list[int], length: int) -> Batch:
    """The ``rows`` of ``shard``, per-token fields (``[B, L, ...]`` like ``input_ids``) cut to ``length``."""
    if length == shard["input_ids"].shape[1] and rows == list(range(rows[0], rows[-1] + 1)):
        return {key: value[rows[0] : rows[-1] + 1] for key, value in shard.items()}  # views: nothing to copy
    index = torch.tensor(rows)
    per_token = shard["input_ids"].shape
    return {
        key: value[index, :length] if value.dim() >= 2 and value.shape[:2] == per_token else value[index]
        for key, value in shard.items()
    }


def budget_metrics(splits: Sequence[MicroBatchSplit], budget: int) -> dict[str, float]:
    """How full the step's micro-batches were (real tokens / budget, their mean) and how many there were."""
    real = [tokens for split in splits for tokens in split.real_tokens]
    return {UTILISATION: sum(real) / (len(real) * budget), MICRO_BATCHES: float(len(real))}
