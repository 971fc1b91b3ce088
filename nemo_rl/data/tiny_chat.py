"""The built-in ``tiny-chat`` SFT dataset, generated from a seed.

The project trains its own tiny model at 4x the original RoPE window and must
not download anything, so it also makes its own data. The tasks are chosen so
that a model of well under a million parameters can learn them, and so that
long context *matters*: in ``copy`` and ``recall`` the answer depends on tokens
that are hundreds of positions back, beyond the model's original 256-token
window. ``arithmetic`` adds short samples so that batches mix lengths.

Lengths are drawn so that a large fraction of the samples tokenize (with the
tiny tokenizer) to more than 256 tokens and none comes near the 1024-token
training length. The same generator also yields the raw text the tiny
tokenizer is trained on (:func:`tiny_chat_corpus`), so every word the data uses
is in the tokenizer's merges.
"""

from __future__ import annotations

import random
from pathlib import Path

from nemo_rl.data.jsonl_splits import write_splits

Message = dict[str, str]

NUM_TRAIN = 400
NUM_VALIDATION = 40

# A small closed vocabulary: the model can learn every word's embedding from 400 samples.
WORDS = (
    "apple banana cherry grape lemon mango melon peach pear plum "
    "red blue green yellow black white orange purple brown gray "
    "cat dog bird fish horse cow sheep goat mouse frog "
    "sun moon star rain snow wind cloud river stone tree"
).split()
# Recall keys are a code word plus a digit: 200 distinct keys, each a couple of tokens.
KEY_WORDS = "alpha bravo delta echo golf hotel kilo lima oscar papa quebec romeo sierra tango victor whiskey xray yankee zulu mike".split()

COPY_WORDS = (8, 190)  # words to repeat; ~2 tokens per word counting prompt and answer
RECALL_PAIRS = (4, 100)  # key: value lines; ~6 tokens per pair
SYSTEM_PROMPT = "You are a careful assistant. Answer exactly."


def copy_task(rng: random.Random) -> tuple[str, str]:
    """Repeat a word list verbatim: every answer token is found far back in the prompt."""
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*COPY_WORDS)))
    return f"Repeat these words exactly:\n{words}", words


def recall_task(rng: random.Random) -> tuple[str, str]:
    """Look up one value among many ``key: value`` lines: the needle can sit anywhere in the context."""
    keys = rng.sample([f"{word}{digit}" for word in KEY_WORDS for digit in range(10)], rng.randint(*RECALL_PAIRS))
    values = {key: rng.randint(0, 999) for key in keys}
    query = rng.choice(keys)
    lines = "\n".join(f"{key}: {value}" for key, value in values.items())
    return f"Remember these values:\n{lines}\nWhat is the value of {query}?", f"{query}: {values[query]}"


def arithmetic_task(rng: random.Random) -> tuple[str, str]:
    """Two-operand sums and differences: short samples that keep batches mixed in length."""
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    op = rng.choice("+-")
    result = a + b if op == "+" else a - b
    return f"What is {a} {op} {b}?", f"{a} {op} {b} = {result}"


_TASKS = ((copy_task, 0.4), (recall_task, 0.4), (arithmetic_task, 0.2))


def _conversation(rng: random.Random) -> list[Message]:
    """One row: an optional system prompt (half the rows, so the model sees both forms), a question, the answer."""
    task = rng.choices([t for t, _ in _TASKS], weights=[w for _, w in _TASKS])[0]
    question, answer = task(rng)
    messages = [{"role": "system", "content": SYSTEM_PROMPT}] if rng.random() < 0.5 else []
    return messages + [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def generate_split(split: str, seed: int = 0) -> list[list[Message]]:
    """The conversations of one split; each split has its own random stream, so they never share rows by construction."""
    count = {"train": NUM_TRAIN, "validation": NUM_VALIDATION}[split]
    rng = random.Random(f"tiny-chat/{split}/{seed}")
    return [_conversation(rng) for _ in range(count)]


def tiny_chat_corpus(seed: int = 0) -> list[str]:
    """Raw text for training the tiny tokenizer: role names and contents of both splits, one string per message."""
    return [
        f"{message['role']}\n{message['content']}"
        for split in ("train", "validation")
        for conversation in generate_split(split, seed)
        for message in conversation
    ]


def write_tiny_chat(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """Write ``train.jsonl`` and ``validation.jsonl`` (rows of ``{"messages": [...]}``) into ``out_dir``."""
    return write_splits(out_dir, lambda split: [{"messages": m} for m in generate_split(split, seed)])
