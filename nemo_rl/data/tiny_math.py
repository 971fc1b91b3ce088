"""The built-in ``tiny-math`` dataset for GRPO: questions with verifiable numeric answers.

GRPO needs prompts whose answers a program can check (``math_environment``),
in words the tiny tokenizer has as single tokens. So the prompts are the two
answerable tasks of ``tiny-chat`` (what an SFT run on it teaches the tiny
model): short sums and differences, and look-ups of a value among many
``key: value`` lines, whose prompts often run past the original 256-token
window (the answer then sits far back, which is what a YaRN run must handle).
Rows are ``{"messages": [...], "answer": "..."}``: the conversation up to the
question, and the reference the environment verifies.
"""

from __future__ import annotations

import random
from pathlib import Path

from nemo_rl.data.jsonl_splits import write_splits
from nemo_rl.data.tiny_chat import SYSTEM_PROMPT, arithmetic_task, recall_task

NUM_TRAIN = 256
NUM_VALIDATION = 32
LONG_CONTEXT_SHARE = 0.5  # share of look-up rows


def _row(rng: random.Random) -> dict:
    if rng.random() < LONG_CONTEXT_SHARE:
        question, answer = recall_task(rng)
        reference = answer.split(": ", 1)[1]  # "key: value" -> "value"
    else:
        question, answer = arithmetic_task(rng)
        reference = answer.rsplit("= ", 1)[1]  # "a + b = c" -> "c"
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
    return {"messages": messages, "answer": reference}


def generate_split(split: str, seed: int = 0) -> list[dict]:
    count = {"train": NUM_TRAIN, "validation": NUM_VALIDATION}[split]
    rng = random.Random(f"tiny-math/{split}/{seed}")
    return [_row(rng) for _ in range(count)]


def write_tiny_math(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """Write ``train.jsonl`` and ``validation.jsonl`` into ``out_dir``."""
    return write_splits(out_dir, lambda split: generate_split(split, seed))
