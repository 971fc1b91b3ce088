"""SFT data: chat rows (JSONL, JSON or Parquet) -> token ids with an assistant-only loss mask -> padded global batches.

The loss mask comes from the tokenizer's own chat template (its
``{% generation %}`` blocks), so what the model is trained to produce is
exactly what the template renders as the assistant turn, end-of-turn token
included, and the prompt format at generation time cannot drift from the one
used in training.

Batches come from :class:`nemo_rl.data.dataloader.ResumableDataloader`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from transformers import PreTrainedTokenizerBase

from nemo_rl.data.rows import Row, load_rows
from nemo_rl.utils.errors import DataError

logger = logging.getLogger(__name__)

EXPECTED_ROW = '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'


@dataclass(frozen=True)
class SFTSample:
    input_ids: list[int]
    loss_mask: list[int]  # 1 on assistant tokens (the ones trained on), 0 elsewhere


@dataclass(frozen=True)
class SFTDataset:
    """Tokenized samples, with what loading had to change kept visible for logs and tests."""

    samples: list[SFTSample]
    num_truncated: int
    num_dropped: int

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> SFTSample:
        return self.samples[index]


def tokenize_messages(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase) -> SFTSample:
    """Render ``messages`` with the chat template; the template's generation blocks give the loss mask."""
    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    fields = cast(Mapping[str, list[int]], encoded)  # return_dict=True: a BatchEncoding of token lists
    return SFTSample(list(fields["input_ids"]), list(fields["assistant_masks"]))


def truncate(sample: SFTSample, max_seq_len: int) -> SFTSample:
    """Keep the first ``max_seq_len`` tokens: the prompt stays intact and the reply loses its tail."""
    return SFTSample(sample.input_ids[:max_seq_len], sample.loss_mask[:max_seq_len])


def chat_messages(row: Row) -> list[dict[str, str]]:
    """The row's conversation; one without an assistant message has nothing to train on and is refused.

    A row that only loses its reply to truncation is different: it is dropped
    and counted (see ``load_sft_dataset``), since a longer sequence length keeps it.
    """
    messages = row.messages("messages", f"write each row as {EXPECTED_ROW}")
    if not any(message["role"] == "assistant" for message in messages):
        raise row.error("no assistant message to train on", "add the assistant's reply, or remove the row")
    return messages


def load_sft_dataset(path: Path, tokenizer: PreTrainedTokenizerBase, max_seq_len: int) -> SFTDataset:
    """Tokenize every ``{"messages": [...]}`` row of a ``.jsonl``, ``.json`` or ``.parquet`` file.

    Rows longer than ``max_seq_len`` are truncated rather than skipped so long
    samples still teach their beginning; rows left with no assistant token have
    nothing to learn from and are dropped. Both are counted and logged.
    """
    samples: list[SFTSample] = []
    truncated = dropped = 0
    for row in load_rows(path, EXPECTED_ROW):
        messages = chat_messages(row)
        sample = row.tokenized(tokenize_messages, messages, tokenizer)
        if len(sample.input_ids) > max_seq_len:
            sample = truncate(sample, max_seq_len)
            truncated += 1
        if not any(sample.loss_mask):
            dropped += 1
            continue
        samples.append(sample)
    if truncated or dropped:
        logger.warning(
            "%s: truncated %d samples to %d tokens, dropped %d without assistant tokens",
            path,
            truncated,
            max_seq_len,
            dropped,
        )
    if not samples:
        raise DataError(
            f"{path}: no sample has an assistant token to train on within {max_seq_len} tokens; raise "
            "policy.max_total_sequence_length, or use a tokenizer whose chat template marks assistant replies "
            "with {% generation %}...{% endgeneration %}"
        )
    return SFTDataset(samples, truncated, dropped)


def collate(samples: Sequence[SFTSample], pad_id: int, divisible_by: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest sample rounded up to a multiple of ``divisible_by``.

    Padding only to the batch maximum keeps short batches cheap; the rounding
    satisfies kernels and parallelism that need the sequence length to divide evenly.
    """
    lengths = [len(sample.input_ids) for sample in samples]
    width = -(-max(lengths) // divisible_by) * divisible_by
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, sample in enumerate(samples):
        input_ids[row, : lengths[row]] = torch.tensor(sample.input_ids, dtype=torch.long)
        loss_mask[row, : lengths[row]] = torch.tensor(sample.loss_mask, dtype=torch.long)
    return {"input_ids": input_ids, "loss_mask": loss_mask, "input_lengths": torch.tensor(lengths, dtype=torch.long)}
