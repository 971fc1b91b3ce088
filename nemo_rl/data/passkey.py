"""Passkey-retrieval prompts as the YaRN paper (arXiv:2309.00071) ran them, regenerated offline.

A random integer key hides at a chosen depth inside repeated filler text; the
model must repeat it. Prompts are built to a token budget with the model's own
tokenizer, so "length" means what the model actually sees.
"""

from __future__ import annotations

import random
import re
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
    needle = NEEDLE.format(key=key)
    fixed = len(tokenizer(needle + QUESTION, add_special_tokens=False)["input_ids"])
    per_filler = len(tokenizer(FILLER * 8, add_special_tokens=False)["input_ids"]) / 8
    repeats = max(int((length - fixed) / per_filler), 1)
    while True:
        before = int(round(repeats * depth))
        text = FILLER * before + needle + FILLER * (repeats - before) + QUESTION
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= length or repeats == 1:
            return PasskeyPrompt(text, key, length, depth)
        repeats -= 1


def passkey_correct(completion: str, key: int) -> bool:
    """The paper's score: the first integer in the completion equals the key."""
    match = re.search(r"\d+", completion)
    return match is not None and int(match.group()) == key
