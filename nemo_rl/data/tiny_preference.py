"""The built-in ``tiny-preference`` dataset for DPO and reward modeling: chosen/rejected replies to one context.

Preference training on CPU in a few steps only shows whether it works if the
data is *separable*: a reward model must be able to beat chance and a DPO
margin must be able to grow before the run ends. So the pairs come in two
difficulties. Half the rejections are off-topic word salad (a few random
words), which even an untrained model separates from an on-topic answer almost
at once; the other half are wrong answers in exactly the right form (the
correct number plus a nonzero offset), the hard half that only a model which
reads the context can tell apart. The contexts are the two answerable tasks of
``tiny-chat`` (sums and differences, and look-ups of a value among many
``key: value`` lines), in words the tiny tokenizer has as single tokens; half
are look-ups, so many pairs run past the original 256-token window, which is
what a YaRN run must handle.

Rows are ``{"context": [...], "chosen": [...], "rejected": [...]}``: the
conversation up to the user's question, then one assistant message per side.
"""

from __future__ import annotations

import random
from pathlib import Path

from nemo_rl.data.jsonl_splits import write_splits
from nemo_rl.data.tiny_chat import SYSTEM_PROMPT, WORDS, Message, arithmetic_task, recall_task

NUM_TRAIN = 256
NUM_VALIDATION = 32
LONG_CONTEXT_SHARE = 0.5  # share of look-up rows
OFF_TOPIC_SHARE = 0.5  # share of rows whose rejection is word salad (the easy half)
OFF_TOPIC_WORDS = (3, 8)
MAX_OFFSET = 9  # wrong answers are off by 1..MAX_OFFSET either way: close enough to need the context


def _wrong_answer(answer: str, rng: random.Random) -> str:
    """``answer`` with its final number moved by a nonzero offset, so only the value gives it away.

    Both task answers end in the number (``"a + b = c"``, ``"key: value"``), so
    one rule keeps the form of either.
    """
    head, number = answer.rsplit(" ", 1)
    offset = rng.choice((-1, 1)) * rng.randint(1, MAX_OFFSET)
    return f"{head} {int(number) + offset}"


def _off_topic(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(*OFF_TOPIC_WORDS)))


def _row(rng: random.Random) -> dict[str, list[Message]]:
    task = recall_task if rng.random() < LONG_CONTEXT_SHARE else arithmetic_task
    question, answer = task(rng)
    # An optional system prompt, as in tiny-chat, so a policy SFT-trained on it sees both forms here too.
    context = [{"role": "system", "content": SYSTEM_PROMPT}] if rng.random() < 0.5 else []
    context.append({"role": "user", "content": question})
    rejected = _off_topic(rng) if rng.random() < OFF_TOPIC_SHARE else _wrong_answer(answer, rng)
    return {
        "context": context,
        "chosen": [{"role": "assistant", "content": answer}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def generate_split(split: str, seed: int = 0) -> list[dict[str, list[Message]]]:
    """The pairs of one split; each split has its own random stream, so they never share rows by construction."""
    count = {"train": NUM_TRAIN, "validation": NUM_VALIDATION}[split]
    rng = random.Random(f"tiny-preference/{split}/{seed}")
    return [_row(rng) for _ in range(count)]


def write_tiny_preference(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """Write ``train.jsonl`` and ``validation.jsonl`` into ``out_dir``."""
    return write_splits(out_dir, lambda split: generate_split(split, seed))
