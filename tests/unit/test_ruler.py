"""RULER-style prompts: token budget, needle depth, distractors, answerability, scoring, accuracy by length."""

from __future__ import annotations

import random
import re

import pytest
from transformers import AutoTokenizer

from nemo_rl.config.schema import LongContextEvalConfig
from nemo_rl.data.passkey import FILLER, token_count
from nemo_rl.data.ruler import (
    NIAH_QUESTION,
    RULER_TASKS,
    make_multikey_prompt,
    make_variable_tracking_prompt,
    ruler_score,
)
from nemo_rl.evals.retrieval import ruler_accuracy
from nemo_rl.models.builtin_models import resolve_model_path


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model_path("tiny-qwen2"))


def solve(text: str, task: str) -> list[str]:
    """What a perfect reader answers, from the prompt text alone."""
    if task == "niah_multikey":
        word = re.search(r"special magic number for (\w+) mentioned", text).group(1)
        return re.findall(rf"magic numbers for {word} is: (\d+)\.", text)
    value = re.search(r"assigned the value (\d+) in the text above", text).group(1)
    names = re.findall(rf"VAR ([A-Z]+) = {value}\.", text)
    while True:  # follow the chain: each VAR B = VAR A where A already holds the value
        new = [b for b, a in re.findall(r"VAR ([A-Z]+) = VAR ([A-Z]+)\.", text) if a in names and b not in names]
        if not new:
            return names
        names += new


@pytest.mark.parametrize("task", sorted(RULER_TASKS))
@pytest.mark.parametrize("length", [512, 800, 1024])
def test_prompts_fit_their_budget_with_the_answer_and_are_answerable(tokenizer, task, length):
    prompt = RULER_TASKS[task](tokenizer, length, random.Random(length))
    n_tokens = token_count(tokenizer, prompt.text)
    assert n_tokens + prompt.max_new_tokens <= length
    assert n_tokens + prompt.max_new_tokens > length - token_count(tokenizer, FILLER), "the filler fills the budget"
    assert prompt.max_new_tokens > token_count(tokenizer, " ".join(prompt.answers))
    assert sorted(solve(prompt.text, task)) == sorted(prompt.answers)


def test_multikey_needles_are_distinct_and_the_queried_one_sits_at_its_depth(tokenizer):
    for seed in range(5):
        prompt = make_multikey_prompt(tokenizer, 1024, random.Random(seed), num_needles=4)
        needles = re.findall(r"One of the special magic numbers for (\w+) is: (\d+)\.", prompt.text)
        assert len({word for word, _ in needles}) == 4 and len({number for _, number in needles}) == 4
        assert prompt.text.count(prompt.answers[0]) == 1
        word = next(w for w, n in needles if n == prompt.answers[0])
        assert prompt.text.endswith(NIAH_QUESTION.format(word=word))
        at = prompt.text.index(f"for {word} is: ")
        repeats = prompt.text.count(FILLER)
        assert prompt.text[:at].count(FILLER) == round(repeats * prompt.depths[0])


def test_variable_tracking_has_distractor_chains_in_order_at_their_depths(tokenizer):
    prompt = make_variable_tracking_prompt(tokenizer, 1024, random.Random(3), num_chains=3, num_hops=4)
    assert len(re.findall(r"VAR [A-Z]{5} = \d+\.", prompt.text)) == 3, "one chain asked for, two distractors"
    assert len(re.findall(r"VAR [A-Z]{5} = VAR [A-Z]{5}\.", prompt.text)) == 3 * 4
    repeats = prompt.text.count(FILLER)
    positions = [prompt.text.index(f"VAR {name} = ") for name in prompt.answers]
    assert positions == sorted(positions), "a chain's assignments appear in order"
    for at, depth in zip(positions, prompt.depths, strict=True):
        assert prompt.text[:at].count(FILLER) == round(repeats * depth)


@pytest.mark.parametrize("task", sorted(RULER_TASKS))
def test_prompts_are_deterministic_from_the_seed(tokenizer, task):
    first = RULER_TASKS[task](tokenizer, 600, random.Random(7))
    assert RULER_TASKS[task](tokenizer, 600, random.Random(7)) == first
    assert RULER_TASKS[task](tokenizer, 600, random.Random(8)).answers != first.answers


@pytest.mark.parametrize("task", sorted(RULER_TASKS))
def test_a_length_too_short_for_the_needles_is_an_error_naming_the_task(tokenizer, task):
    with pytest.raises(ValueError, match=rf"{task}: a length of 100 tokens is too short"):
        RULER_TASKS[task](tokenizer, 100, random.Random(0))


def test_scoring_is_rulers_string_match_all():
    assert ruler_score(" ABCDE, FGHIJ and klmno.", ["ABCDE", "FGHIJ", "KLMNO"]) == 1.0  # case-insensitive
    assert ruler_score(" ABCDE only", ["ABCDE", "FGHIJ"]) == 0.5  # partial credit, as RULER scores it
    assert ruler_score(" 1234567", ["7654321"]) == 0.0


def test_the_config_default_names_every_task():
    defaults = LongContextEvalConfig.model_fields["ruler_tasks"].default
    assert sorted(defaults) == sorted(RULER_TASKS)


class OracleGenerator:
    """Answers from the prompt text like a perfect reader, or wrongly (``wrong``); records what it was asked."""

    def __init__(self, tokenizer, wrong: bool = False):
        self.tokenizer, self.wrong, self.calls = tokenizer, wrong, []

    def generate(self, prompt_token_ids, max_new_tokens):
        self.calls.append(([len(p) for p in prompt_token_ids], max_new_tokens))
        texts = [self.tokenizer.decode(p) for p in prompt_token_ids]
        task = "niah_multikey" if "magic number" in texts[0] else "variable_tracking"
        return [" nothing" if self.wrong else " " + " ".join(solve(text, task)) for text in texts]


@pytest.mark.parametrize("task", sorted(RULER_TASKS))
def test_accuracy_by_length_scores_every_trial_within_its_length(tokenizer, task):
    oracle = OracleGenerator(tokenizer)
    points = ruler_accuracy(oracle, tokenizer, task, [512, 768], trials=3, seed=1)
    assert [(p.task, p.length, p.accuracy, p.trials) for p in points] == [(task, 512, 1.0, 3), (task, 768, 1.0, 3)]
    asked = [(n, budget) for lengths, budget in oracle.calls for n in lengths]
    assert len(asked) == 6 and all(n + budget <= 768 for n, budget in asked)
    assert all(n + budget <= 512 for n, budget in asked[: len(asked) // 2])
    wrong = ruler_accuracy(OracleGenerator(tokenizer, wrong=True), tokenizer, task, [512], trials=3, seed=1)
    assert wrong[0].accuracy == 0.0


def test_unknown_task_is_an_error_listing_the_known_ones(tokenizer):
    with pytest.raises(ValueError, match="known: niah_multikey, variable_tracking"):
        ruler_accuracy(OracleGenerator(tokenizer), tokenizer, "qa", [512], trials=1)


def test_the_config_schema_names_exactly_the_tasks_the_data_layer_builds():
    from typing import get_args

    from nemo_rl.config.schema import RulerTask

    assert sorted(get_args(RulerTask)) == sorted(RULER_TASKS)
