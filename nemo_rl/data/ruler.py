"""Two RULER tasks (arXiv:2404.06654) regenerated offline from templates: multi-key needles and variable tracking.

Plain passkey retrieval saturates early (ProLong, arXiv:2410.02660): one
needle in repeated filler can be found by pattern rather than by reading. RULER
makes retrieval harder with distractors (several needles, one asked for) and
multi-hop tracing (a value passed along a chain of assignments, beside other
chains). Both prompts are built here with the passkey's filler, to a token
budget measured with the model's own tokenizer, deterministically from the
caller's ``random.Random``; nothing is downloaded. RULER's instruction lines
are left out (base models do not follow them, and at the short windows this
project trains they would take the haystack's place); the needles and questions
are RULER's.

A prompt's ``length`` counts the prompt *and* the tokens the model may generate
for its answer, so a prompt of length L never needs more than L positions (vLLM
refuses a sequence beyond its ``max_model_len``). Answers are scored as RULER's
``string_match_all``: the share of expected strings found in the completion.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from nemo_rl.config.schema import RulerTask
from nemo_rl.data.passkey import fill_to_budget, token_count

NIAH_NEEDLE = "One of the special magic numbers for {word} is: {number}. "
NIAH_QUESTION = (
    "What is the special magic number for {word} mentioned in the provided text? "
    "The special magic number for {word} mentioned in the provided text is"
)
VT_FIRST = "VAR {name} = {value}. "
VT_HOP = "VAR {name} = VAR {previous}. "
VT_QUESTION = (
    "Question: Find all variables that are assigned the value {value} in the text above. "
    "Answer: {count} variables are assigned the value {value}, they are:"
)
# Needle keys (RULER draws random words; a fixed list keeps the task offline and reproducible).
WORDS = (
    "amber anchor apple arrow badge basket beacon blanket bottle bridge candle canyon carpet castle cedar cherry "
    "circle clover comet copper cotton crystal dragon eagle ember falcon feather forest garden glacier harbor "
    "helmet island jacket jungle kettle ladder lantern lemon marble meadow mirror needle orbit orchid pebble "
    "pepper pillow planet pocket quartz rabbit ribbon saddle shadow silver spider summit tiger timber tunnel "
    "velvet violin walnut willow window winter"
).split()
ANSWER_MARGIN = 4  # generated tokens beyond the written-out answer (a leading space, a full stop)


@dataclass(frozen=True)
class RulerPrompt:
    task: str
    text: str
    answers: tuple[str, ...]  # every string a correct completion contains
    length: int  # token budget of the prompt plus max_new_tokens
    max_new_tokens: int  # enough to write all answers out
    depths: tuple[float, ...]  # where the queried needle (or each assignment of the queried chain) sits


def make_multikey_prompt(
    tokenizer: PreTrainedTokenizerBase, length: int, rng: random.Random, num_needles: int = 4
) -> RulerPrompt:
    """RULER's ``niah_multikey``: ``num_needles`` word -> 7-digit number needles at random depths, one asked for."""
    words = rng.sample(WORDS, num_needles)
    numbers = [rng.randint(1_000_000, 9_999_999) for _ in words]
    depths = [rng.random() for _ in words]
    target = rng.randrange(num_needles)
    insertions = [(d, NIAH_NEEDLE.format(word=w, number=n)) for d, w, n in zip(depths, words, numbers, strict=True)]
    question = NIAH_QUESTION.format(word=words[target])
    answers = (str(numbers[target]),)
    return _build(tokenizer, "niah_multikey", length, insertions, question, answers, (depths[target],))


def make_variable_tracking_prompt(
    tokenizer: PreTrainedTokenizerBase, length: int, rng: random.Random, num_chains: int = 2, num_hops: int = 4
) -> RulerPrompt:
    """RULER's ``vt``: ``num_chains`` chains ``VAR A = 12345``, ``VAR B = VAR A``, ... (``num_hops`` hops each),
    every chain's assignments in order at random depths; the question asks for the names of the first chain."""
    names = _unique_names(rng, num_chains * (num_hops + 1))
    chains = [names[i * (num_hops + 1) : (i + 1) * (num_hops + 1)] for i in range(num_chains)]
    values = rng.sample(range(10000, 100000), num_chains)
    depths = [sorted(rng.random() for _ in chain) for chain in chains]
    insertions = [
        pair
        for chain, value, chain_depths in zip(chains, values, depths, strict=True)
        for pair in zip(chain_depths, _chain_statements(chain, value), strict=True)
    ]
    question = VT_QUESTION.format(value=values[0], count=num_hops + 1)
    return _build(tokenizer, "variable_tracking", length, insertions, question, tuple(chains[0]), tuple(depths[0]))


def _chain_statements(chain: Sequence[str], value: int) -> list[str]:
    """``VAR A = value``, then each name assigned from the one before it."""
    return [VT_FIRST.format(name=chain[0], value=value)] + [
        VT_HOP.format(name=name, previous=previous) for previous, name in zip(chain, chain[1:])
    ]


def _unique_names(rng: random.Random, count: int) -> list[str]:
    """Distinct 5-letter upper-case variable names (RULER's form: no name is a substring of another)."""
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names:
            names.append(name)
    return names


def _build(
    tokenizer: PreTrainedTokenizerBase,
    task: str,
    length: int,
    insertions: Sequence[tuple[float, str]],
    question: str,
    answers: tuple[str, ...],
    depths: tuple[float, ...],
) -> RulerPrompt:
    """The prompt filled to ``length`` minus the answer's tokens; an error if the needles alone do not fit."""
    max_new_tokens = token_count(tokenizer, " " + " ".join(answers)) + ANSWER_MARGIN
    budget = length - max_new_tokens
    text = fill_to_budget(tokenizer, budget, insertions, question)
    needed = token_count(tokenizer, text) + max_new_tokens
    if needed > length:
        raise ValueError(
            f"{task}: a length of {length} tokens is too short: its needles, one filler block, the question and "
            f"the answer need {needed}"
        )
    return RulerPrompt(task, text, answers, length, max_new_tokens, depths)


def ruler_score(completion: str, answers: Sequence[str]) -> float:
    """RULER's ``string_match_all``: the share of ``answers`` found (case-insensitively) in the completion."""
    found = sum(answer.lower() in completion.lower() for answer in answers)
    return found / len(answers)


RULER_TASKS: dict[RulerTask, Callable[[PreTrainedTokenizerBase, int, random.Random], RulerPrompt]] = {
    "niah_multikey": make_multikey_prompt,
    "variable_tracking": make_variable_tracking_prompt,
}
