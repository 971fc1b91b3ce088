"""Preference data for DPO and reward modeling: context + chosen/rejected replies -> token-id pairs -> batches.

Each side of a pair is the full conversation (context, then that side's
assistant reply) tokenized like an SFT sample, so the loss mask comes from the
tokenizer's chat template (:func:`nemo_rl.data.sft_dataset.tokenize_messages`)
and marks exactly the reply the two sides differ in.

Pairs too long for the run are dropped, never truncated: the two sides share
their context and differ only at the end, so cutting them could remove exactly
the part that tells chosen from rejected and leave a pair that teaches noise.
Drops are counted and logged so a too-short sequence length is visible.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from nemo_rl.data.rows import read_rows
from nemo_rl.data.sft_dataset import SFTSample, collate, tokenize_messages

logger = logging.getLogger(__name__)

EXPECTED_ROW = (
    '{"context": [{"role": ..., "content": ...}, ...], '
    '"chosen": [{"role": "assistant", "content": ...}], "rejected": [{"role": "assistant", "content": ...}]}'
)


@dataclass(frozen=True)
class PreferencePair:
    chosen: SFTSample
    rejected: SFTSample


@dataclass(frozen=True)
class PreferenceDataset:
    """Tokenized pairs, with the number dropped for length kept visible for logs and tests."""

    pairs: list[PreferencePair]
    num_dropped: int

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> PreferencePair:
        return self.pairs[index]


def _is_assistant_reply(messages: object) -> bool:
    return (
        isinstance(messages, list)
        and bool(messages)
        and all(
            isinstance(m, dict) and m.get("role") == "assistant" and isinstance(m.get("content"), str) for m in messages
        )
    )


def _parse_row(row: dict, path: Path, row_no: int) -> tuple[list[dict], list[dict], list[dict]]:
    """(context, chosen, rejected) of one row, or a ValueError naming the file, the row and the expected shape."""
    context, chosen, rejected = row.get("context"), row.get("chosen"), row.get("rejected")
    checks = (
        ("context", isinstance(context, list) and bool(context) and all(isinstance(m, dict) for m in context)),
        ("chosen", _is_assistant_reply(chosen)),
        ("rejected", _is_assistant_reply(rejected)),
    )
    invalid = [repr(key) for key, ok in checks if not ok]
    if invalid:
        raise ValueError(
            f"{path}: row {row_no}: missing or invalid {', '.join(invalid)}; expected {EXPECTED_ROW} "
            "(a non-empty context, and chosen and rejected each a non-empty list of assistant messages)"
        )
    return context, chosen, rejected


def load_preference_dataset(path: Path, tokenizer: PreTrainedTokenizerBase, max_seq_len: int) -> PreferenceDataset:
    """Tokenize every ``{"context", "chosen", "rejected"}`` row of a ``.jsonl`` or ``.parquet`` file.

    A pair with either side longer than ``max_seq_len`` tokens is dropped whole (counted and logged).
    """
    rows = read_rows(path)
    if not rows:
        raise ValueError(f"{path}: no rows; expected {EXPECTED_ROW} per row")
    pairs: list[PreferencePair] = []
    dropped = 0
    for row_no, row in enumerate(rows, 1):
        context, chosen, rejected = _parse_row(row, path, row_no)
        pair = PreferencePair(
            tokenize_messages(context + chosen, tokenizer), tokenize_messages(context + rejected, tokenizer)
        )
        if max(len(pair.chosen.input_ids), len(pair.rejected.input_ids)) > max_seq_len:
            dropped += 1
            continue
        pairs.append(pair)
    if dropped:
        logger.warning(
            "%s: dropped %d of %d preference pairs with a side longer than %d tokens",
            path,
            dropped,
            len(rows),
            max_seq_len,
        )
    if not pairs:
        raise ValueError(
            f"{path}: all {dropped} preference pairs have a side longer than max_seq_len={max_seq_len} tokens; "
            "raise policy.max_total_sequence_length (or shorten the data)"
        )
    return PreferenceDataset(pairs, dropped)


def collate_pairs(pairs: Sequence[PreferencePair], pad_id: int, divisible_by: int) -> dict[str, torch.Tensor]:
    """A padded batch of rows chosen, rejected, chosen, ...: row ``2i`` is pair ``i``'s chosen, ``2i + 1`` its rejected.

    Interleaving rather than stacking all chosen before all rejected means any
    contiguous split of the batch into an even number of rows (micro-batches,
    data-parallel shards) keeps both sides of every pair together, which the
    DPO and Bradley-Terry losses need since they compare the two sides of a pair.
    """
    return collate([side for pair in pairs for side in (pair.chosen, pair.rejected)], pad_id, divisible_by)
