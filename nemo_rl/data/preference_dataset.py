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

from nemo_rl.data.rows import Row, load_rows
from nemo_rl.data.sft_dataset import SFTSample, collate, tokenize_messages
from nemo_rl.utils.errors import DataError

logger = logging.getLogger(__name__)

EXPECTED_ROW = (
    '{"context": [{"role": "user", "content": "..."}], '
    '"chosen": [{"role": "assistant", "content": "..."}], "rejected": [{"role": "assistant", "content": "..."}]}'
)
REPLY_ONLY = "keep the shared conversation in 'context' and only the assistant's reply in 'chosen' and 'rejected'"


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


def _parse_row(row: Row) -> tuple[list[dict], list[dict], list[dict]]:
    """(context, chosen, rejected) of one row: a conversation, then each side's assistant reply.

    A side that is missing or empty leaves nothing to compare, and a side with
    a non-assistant message would put different prompts under the two sides.
    """
    fix = f"write each row as {EXPECTED_ROW}"
    context = row.messages("context", fix)
    chosen, rejected = (row.messages(side, fix, ("assistant",), REPLY_ONLY) for side in ("chosen", "rejected"))
    return context, chosen, rejected


def load_preference_dataset(path: Path, tokenizer: PreTrainedTokenizerBase, max_seq_len: int) -> PreferenceDataset:
    """Tokenize every ``{"context", "chosen", "rejected"}`` row of a ``.jsonl``, ``.json`` or ``.parquet`` file.

    A pair with either side longer than ``max_seq_len`` tokens is dropped whole (counted and logged).
    """
    rows = load_rows(path, EXPECTED_ROW)
    pairs: list[PreferencePair] = []
    dropped = 0
    for row in rows:
        context, chosen, rejected = _parse_row(row)
        pair = PreferencePair(
            row.tokenized(tokenize_messages, context + chosen, tokenizer),
            row.tokenized(tokenize_messages, context + rejected, tokenizer),
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
        raise DataError(
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
