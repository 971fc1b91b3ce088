"""SFT data: chat JSONL -> token ids with an assistant-only loss mask -> padded global batches.

The loss mask comes from the tokenizer's own chat template (its
``{% generation %}`` blocks), so what the model is trained to produce is
exactly what the template renders as the assistant turn, end-of-turn token
included, and the prompt format at generation time cannot drift from the one
used in training.

The data loader is deterministic and resumable: the order of an epoch depends
only on (seed, epoch), and its state is (epoch, batch index), so a run resumed
from a checkpoint sees exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


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
    return SFTSample(list(encoded["input_ids"]), list(encoded["assistant_masks"]))


def truncate(sample: SFTSample, max_seq_len: int) -> SFTSample:
    """Keep the first ``max_seq_len`` tokens: the prompt stays intact and the reply loses its tail."""
    return SFTSample(sample.input_ids[:max_seq_len], sample.loss_mask[:max_seq_len])


def load_sft_dataset(path: Path, tokenizer: PreTrainedTokenizerBase, max_seq_len: int) -> SFTDataset:
    """Tokenize every ``{"messages": [...]}`` row of a JSONL file.

    Rows longer than ``max_seq_len`` are truncated rather than skipped so long
    samples still teach their beginning; rows left with no assistant token have
    nothing to learn from and are dropped. Both are counted and logged.
    """
    samples: list[SFTSample] = []
    truncated = dropped = 0
    with Path(path).open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                messages = json.loads(line)["messages"]
            except (json.JSONDecodeError, KeyError) as err:
                raise ValueError(f"{path}:{line_no}: expected a JSON object with a 'messages' list") from err
            sample = tokenize_messages(messages, tokenizer)
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
        raise ValueError(
            f"{path}: no sample has an assistant token to train on; the tokenizer's chat template must mark "
            "assistant replies with {% generation %}...{% endgeneration %}"
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


class SFTDataloader:
    """Endless iterator over global batches (lists of samples), epoch after epoch, dropping the last partial batch.

    ``epoch`` counts completed passes: it advances right after the last batch of
    an epoch is handed out, so ``epoch < max_epochs`` stops a loop at a clean boundary.
    """

    def __init__(self, dataset: Sequence[SFTSample], global_batch_size: int, shuffle: bool, seed: int):
        if len(dataset) < global_batch_size:
            raise ValueError(f"dataset has {len(dataset)} samples, fewer than one global batch of {global_batch_size}")
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.batches_per_epoch = len(dataset) // global_batch_size
        self.epoch = 0
        self.batch_index = 0  # batches already handed out in the current epoch

    def _order(self, epoch: int) -> np.ndarray:
        """Sample order of ``epoch``: a function of (seed, epoch) only, so it can be recomputed on resume."""
        if not self.shuffle:
            return np.arange(len(self.dataset))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))

    def next_batch(self) -> list[SFTSample]:
        start = self.batch_index * self.global_batch_size
        indices = self._order(self.epoch)[start : start + self.global_batch_size]
        self.batch_index += 1
        if self.batch_index == self.batches_per_epoch:
            self.epoch += 1
            self.batch_index = 0
        return [self.dataset[int(i)] for i in indices]

    def __iter__(self) -> Iterator[list[SFTSample]]:
        return self

    def __next__(self) -> list[SFTSample]:
        return self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """Position plus what it is relative to, so a resume under a different data setup fails loudly."""
        return {
            "epoch": self.epoch,
            "batch_index": self.batch_index,
            "num_samples": len(self.dataset),
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = (len(self.dataset), self.global_batch_size)
        if (state["num_samples"], state["global_batch_size"]) != expected:
            raise ValueError(
                f"dataloader state was saved for {state['num_samples']} samples in batches of {state['global_batch_size']}, "
                f"but this run has {expected[0]} in batches of {expected[1]}: the resumed batches would differ"
            )
        self.epoch = int(state["epoch"])
        self.batch_index = int(state["batch_index"])
