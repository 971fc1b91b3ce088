"""Retrieval accuracy by context length: the passkey grid (length x depth) and RULER-style tasks.

Prompts come from ``nemo_rl.data.passkey`` and ``nemo_rl.data.ruler``; a cell's
prompts depend only on (seed, task, length, depth), so adding a length or a
depth to a configuration leaves the other cells' prompts, and scores, as they
were. A prompt of length L holds its answer too (L minus the generated tokens
for the prompt), so it fits any engine whose window is at least L.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from nemo_rl.data.passkey import make_passkey_prompt, passkey_correct
from nemo_rl.data.ruler import RULER_TASKS, ruler_score
from nemo_rl.evals.generators import Generator

PASSKEY_NEW_TOKENS = 10  # the paper's generation budget for the key


@dataclass(frozen=True)
class PasskeyPoint:
    length: int
    depth: float
    accuracy: float
    trials: int


@dataclass(frozen=True)
class RulerPoint:
    task: str
    length: int
    accuracy: float  # mean RULER score (share of expected strings in the completion)
    trials: int


def cell_rng(seed: int, *cell: object) -> random.Random:
    """A generator for one cell of a grid (string seeds hash the same in every process, unlike ``hash()``)."""
    return random.Random(":".join(str(part) for part in (seed, *cell)))


def prompt_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def passkey_grid(
    generator: Generator,
    tokenizer: PreTrainedTokenizerBase,
    lengths: Sequence[int],
    depths: Sequence[float],
    trials: int,
    seed: int = 0,
) -> list[PasskeyPoint]:
    """Accuracy of ``trials`` passkey prompts with random 5-digit keys per (length, depth): greedy, 10 new
    tokens, correct when the completion's first integer is the key (the YaRN paper's score)."""
    points = []
    for length in tqdm(lengths, desc="passkey", leave=False):
        budget = length - PASSKEY_NEW_TOKENS
        cells = []
        for depth in depths:
            rng = cell_rng(seed, "passkey", length, depth)
            cells.append([make_passkey_prompt(tokenizer, budget, depth, rng) for _ in range(trials)])
        prompts = [prompt for cell in cells for prompt in cell]
        texts = generator.generate([prompt_ids(tokenizer, p.text) for p in prompts], PASSKEY_NEW_TOKENS)
        for c, (depth, cell) in enumerate(zip(depths, cells, strict=True)):
            answers = texts[c * trials : (c + 1) * trials]
            correct = sum(passkey_correct(text, p.key) for text, p in zip(answers, cell, strict=True))
            points.append(PasskeyPoint(length, depth, correct / trials, trials))
    return points


def ruler_accuracy(
    generator: Generator,
    tokenizer: PreTrainedTokenizerBase,
    task: str,
    lengths: Sequence[int],
    trials: int,
    seed: int = 0,
) -> list[RulerPoint]:
    """Mean RULER score of ``trials`` prompts of ``task`` (a name in ``RULER_TASKS``) at each length, greedy."""
    if task not in RULER_TASKS:
        raise ValueError(f"unknown RULER task {task!r}; known: {', '.join(RULER_TASKS)}")
    points = []
    for length in tqdm(lengths, desc=f"ruler {task}", leave=False):
        rng = cell_rng(seed, task, length)
        prompts = [RULER_TASKS[task](tokenizer, length, rng) for _ in range(trials)]
        texts = generate_each(
            generator, [prompt_ids(tokenizer, p.text) for p in prompts], [p.max_new_tokens for p in prompts]
        )
        score = sum(ruler_score(text, p.answers) for text, p in zip(texts, prompts, strict=True))
        points.append(RulerPoint(task, length, score / trials, trials))
    return points


def generate_each(generator: Generator, prompts: list[list[int]], max_new_tokens: Sequence[int]) -> list[str]:
    """Completions with each prompt's own token budget: one call per distinct budget, so no prompt outgrows its
    length (a longer answer's budget would push a shorter one's prompt past it)."""
    texts = [""] * len(prompts)
    for budget in sorted(set(max_new_tokens)):
        group = [i for i, n in enumerate(max_new_tokens) if n == budget]
        for i, text in zip(group, generator.generate([prompts[i] for i in group], budget), strict=True):
            texts[i] = text
    return texts
