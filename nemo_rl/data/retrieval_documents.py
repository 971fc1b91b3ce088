"""Synthetic retrieval documents for pre-training and extension mixes: passkeys and key-value look-ups.

A model can only be shown to keep retrieval at 4x its window if it retrieves
inside the window first; at the sizes this project trains on CPU, code alone
does not teach that. So the base model sees, beside its code, short documents
whose last tokens must be copied from far back: the YaRN paper's passkey text
(in the varied forms independent implementations write it: with or without the
task line, filler cut at a sentence or mid-word, lines joined by spaces or
newlines, keys of 3 to 7 digits) and ``key: value`` lines with one queried.

Every document is at most ``max_tokens`` long *including* its end-of-document
token, and an extension mix sets that to the original window: then retrieval
accuracy beyond the window measures the extension, not training on the test's
own format at that length. Document ``i`` depends only on ``(seed, i)``, so a
dataset of them is a lazy, resumable sequence that never has to be stored.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from nemo_rl.data.passkey import FILLER, NEEDLE, QUESTION

# The YaRN repository's passkey script opens with this line; some implementations keep it.
TASK_LINE = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
_SENTENCES = [s.strip() + "." for s in FILLER.split(".") if s.strip()]
_KEY_WORDS = (
    "alpha bravo delta echo golf hotel kilo lima oscar papa romeo sierra tango victor whiskey yankee zulu mike "
    "apple banana cherry grape lemon mango melon peach pear plum river stone cloud"
).split()
PASSKEY_SHARE = 0.7  # the rest are key-value look-ups
_MAX_ATTEMPTS = 64


def passkey_text(rng: random.Random, filler_chars: int) -> str:
    """A passkey document with about ``filler_chars`` characters of filler around the needle, answer included."""
    digits = 5 if rng.random() < 0.8 else rng.randint(3, 7)
    key = rng.randint(10 ** (digits - 1), 10**digits - 1)
    depth = rng.random()
    if rng.random() < 0.5:  # whole filler sentences on either side
        count = max(filler_chars // 18, 1)
        sentences = [_SENTENCES[i % len(_SENTENCES)] for i in range(count)]
        cut = round(depth * count)
        before, after = " ".join(sentences[:cut]), " ".join(sentences[cut:])
    else:  # the filler cut by characters, as the YaRN repository's script does
        stream = FILLER * (filler_chars // len(FILLER) + 2)
        cut = int(depth * filler_chars)
        before, after = stream[:cut].strip(), stream[: filler_chars - cut].strip()
    parts = ([TASK_LINE] if rng.random() < 0.5 else []) + [before, NEEDLE.format(key=key).strip(), after, QUESTION]
    return rng.choice([" ", "\n"]).join(p for p in parts if p) + f" {key}."


def key_value_text(rng: random.Random, pairs: int) -> str:
    """``pairs`` lines of ``key: value`` and the value of one of them asked for and given."""
    keys = rng.sample([f"{word}{digit}" for word in _KEY_WORDS for digit in range(10)], pairs)
    values = {key: rng.randint(0, 9999) for key in keys}
    query = rng.choice(keys)
    lines = "\n".join(f"{key}: {value}" for key, value in values.items())
    return f"{lines}\nWhat is the value of {query}? The value of {query} is {values[query]}."


@dataclass(frozen=True)
class RetrievalDocuments(Sequence):
    """``size`` lazily generated documents (token ids ending with ``eos_id``), none longer than ``max_tokens``."""

    tokenizer: PreTrainedTokenizerBase
    max_tokens: int
    size: int
    seed: int = 0

    def __post_init__(self) -> None:
        shortest = len(self._encode(QUESTION + " 12345.")) + len(self._encode(NEEDLE.format(key=12345))) + 1
        if self.max_tokens < shortest:
            raise ValueError(
                f"synthetic retrieval documents need at least {shortest} tokens with this tokenizer, "
                f"got max_tokens={self.max_tokens}"
            )

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> list[int]:  # pyright: ignore[reportIncompatibleMethodOverride]  (int only: loaders never slice)
        if not 0 <= index < self.size:
            raise IndexError(index)
        rng = random.Random(f"retrieval/{self.seed}/{index}")
        passkey = rng.random() < PASSKEY_SHARE
        # Draw a size, then shrink it until the document fits: lengths spread over the whole window. Each
        # attempt also redraws the form (task line, separators, key length), so a short window still fits.
        size = rng.randint(8, 4 * self.max_tokens) if passkey else rng.randint(2, max(self.max_tokens // 8, 2))
        for _ in range(_MAX_ATTEMPTS):
            text = passkey_text(rng, size) if passkey else key_value_text(rng, size)
            ids = self._encode(text) + [self.tokenizer.eos_token_id]
            if len(ids) <= self.max_tokens:
                return ids
            size = max(int(size * self.max_tokens / len(ids) * 0.95), 1)
        raise ValueError(f"retrieval document {index} does not fit {self.max_tokens} tokens")
