"""GRPO prompts: chat rows with a reference answer -> prompt token ids ready for generation.

GRPO samples its own replies, so a row holds only the conversation up to the
question plus the answer a program verifies. The prompt is rendered by the
tokenizer's chat template with the generation prompt appended, the same way
the model will be prompted after training, so rollouts never see a format the
policy was not trained on.

Prompts too long for the run are dropped, never truncated: cutting a prompt
removes its end, which is where the question sits, and a reward for answering
a question the model never saw teaches noise. Drops are counted and logged so
a too-short sequence length is visible rather than silently shrinking the data.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from transformers import PreTrainedTokenizerBase

from nemo_rl.data.rows import Row, load_rows
from nemo_rl.utils.errors import DataError

logger = logging.getLogger(__name__)

EXPECTED_ROW = '{"messages": [{"role": "user", "content": "..."}], "answer": "..."}'


@dataclass(frozen=True)
class PromptSample:
    input_ids: list[int]  # the chat template rendered with add_generation_prompt=True
    answer: str  # the reference the environment verifies


@dataclass(frozen=True)
class PromptDataset:
    """Tokenized prompts, with the number dropped for length kept visible for logs and tests."""

    samples: list[PromptSample]
    num_dropped: int

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> PromptSample:
        return self.samples[index]


def tokenize_prompt(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """``messages`` rendered with the chat template, ending in the assistant's generation prompt."""
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)
    return list(cast(Mapping[str, list[int]], encoded)["input_ids"])


def _parse_row(row: Row) -> tuple[list[dict[str, str]], str]:
    """The row's conversation and its reference answer: without one, no reward can be computed."""
    messages = row.messages("messages", f"write each row as {EXPECTED_ROW}")
    answer_fix = f"give the row the reference answer its reward checks, a string or number: {EXPECTED_ROW}"
    answer = row.field("answer", "a non-empty string or a number", _is_answer, answer_fix)
    return messages, str(answer)


def _is_answer(value: object) -> bool:
    if isinstance(value, str):
        return bool(value.strip())
    return isinstance(value, int | float) and not isinstance(value, bool)


def load_prompt_dataset(path: Path, tokenizer: PreTrainedTokenizerBase, max_prompt_length: int) -> PromptDataset:
    """Tokenize every ``{"messages": [...], "answer": ...}`` row of a ``.jsonl``, ``.json`` or ``.parquet`` file.

    Prompts longer than ``max_prompt_length`` tokens are dropped (counted and logged).
    """
    rows = load_rows(path, EXPECTED_ROW)
    samples: list[PromptSample] = []
    dropped = 0
    for row in rows:
        messages, answer = _parse_row(row)
        input_ids = row.tokenized(tokenize_prompt, messages, tokenizer)
        if len(input_ids) > max_prompt_length:
            dropped += 1
            continue
        samples.append(PromptSample(input_ids, answer))
    if dropped:
        logger.warning(
            "%s: dropped %d of %d prompts longer than %d tokens",
            path,
            dropped,
            len(rows),
            max_prompt_length,
        )
    if not samples:
        raise DataError(
            f"{path}: all {dropped} prompts are longer than max_prompt_length={max_prompt_length} tokens; "
            "raise policy.max_total_sequence_length (or shorten the prompts)"
        )
    return PromptDataset(samples, dropped)
