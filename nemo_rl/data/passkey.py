"""Passkey-retrieval prompts as the YaRN paper (arXiv:2309.00071) ran them, regenerated offline.

A random integer key hides at a chosen depth inside repeated filler text; the
model must repeat it. Prompts are built to a token budget with the model's own
tokenizer, so "length" means what the model actually sees.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyPrompt:
    text: str
    key: int
    length: int  # target token budget
    depth: float  # 0 = needle at the start, 1 = at the end of the filler


def make_passkey_prompt(
    tokenizer: PreTrainedTokenizerBase, length: int, depth: float, rng: random.Random
) -> PasskeyPrompt:
    """A prompt of at most ``length`` tokens with the needle at ``depth`` of the filler."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    key = rng.randint(10000, 99999)
    text = fill_to_budget(tokenizer, length, [(depth, NEEDLE.format(key=key))], QUESTION)
    return PasskeyPrompt(text, key, length, depth)


def token_count(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    """Tokens the model sees for ``text`` (no special tokens: prompts are fed as they are built)."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def fill_to_budget(
    tokenizer: PreTrainedTokenizerBase,
    budget: int,
    insertions: Sequence[tuple[float, str]],
    question: str,
) -> str:
    """FILLER repeated with each ``(depth, text)`` of ``insertions`` between whole filler blocks at ``depth`` of the
    filler, then ``question``: as many repeats as keep it within ``budget`` tokens (at least one).

    Shared by the passkey and the RULER-style prompts so "length" and "depth" mean the same in every task.
    """
    fixed = token_count(tokenizer, "".join(text for _, text in insertions) + question)
    per_filler = token_count(tokenizer, FILLER * 8) / 8
    repeats = max(int((budget - fixed) / per_filler), 1)
    while True:
        text = _interleave(repeats, insertions) + question
        if token_count(tokenizer, text) <= budget or repeats == 1:
            return text
        repeats -= 1


def _interleave(repeats: int, insertions: Sequence[tuple[float, str]]) -> str:
    """``repeats`` filler blocks with each insertion after ``round(repeats * depth)`` of them, ties in given order."""
    slots = sorted((int(round(repeats * depth)), order, text) for order, (depth, text) in enumerate(insertions))
    parts, placed = [], 0
    for slot, _, text in slots:
        parts += [FILLER * (slot - placed), text]
        placed = slot
    return "".join(parts) + FILLER * (repeats - placed)


def passkey_correct(completion: str, key: int) -> bool:
    """The paper's score: the first integer in the completion equals the key."""
    match = re.search(r"\d+", completion)
    return match is not None and int(match.group()) == key
