"""Math rewards: equivalence, not string equality; anything malformed scores 0, and so does an answer
whose check cannot finish in time, without stalling the batch."""

from __future__ import annotations

import copy
import operator
import os
import time
from pathlib import Path

import pytest

from nemo_rl.config.loader import load_config, resolve_config
from nemo_rl.config.schema import validate_grpo_config
from nemo_rl.environments.math_environment import Grades, MathEnvironment, answer_format_score, math_reward
from nemo_rl.environments.time_limit import TimeLimitedWorker
from nemo_rl.utils.errors import ConfigError

REWARD_CASES = [
    ("So the answer is \\boxed{0.5}.", "\\frac{1}{2}", 1.0),
    ("12 + 7 = 19", "19", 1.0),
    ("The result is \\boxed{(x+1)^2}", "$x^2+2x+1$", 1.0),
    ("12 + 7 = 18", "19", 0.0),
    ("I do not know.", "19", 0.0),
    ("\\boxed{\\frac{1}{", "19", 0.0),  # unbalanced LaTeX
    ("", "19", 0.0),
    ("19", "", 0.0),  # a broken reference never raises either
]
# math-verify compares it with a number by evaluating the power: 91 s (one core, 164 MB) without a limit.
PATHOLOGICAL = "The answer is \\boxed{9^{9^{8}}}"
VERIFY_TIMEOUT_S = 5.0  # env.math.verify_timeout_s as the recipes ship it


@pytest.fixture(scope="module")
def environment():
    """``environment(format_reward_weight)``: environments sharing one verification worker (its start-up, ~2 s,
    is paid once for the module)."""
    env = MathEnvironment(VERIFY_TIMEOUT_S)

    def weighted(format_reward_weight: float = 0.0) -> MathEnvironment:
        clone = copy.copy(env)
        clone.format_reward_weight = format_reward_weight
        return clone

    yield weighted
    env.close()


@pytest.mark.parametrize(("response", "reference", "reward"), REWARD_CASES)
def test_math_reward(response, reference, reward):
    assert math_reward(response, reference) == reward


def test_the_environment_scores_every_case_as_math_reward_does(environment):
    """The time limit changes where a check runs, not its verdict."""
    responses, references, rewards = map(list, zip(*REWARD_CASES, strict=True))
    assert environment().grade(responses, references) == Grades(rewards, rewards, verify_timeouts=0)


def test_environment_scores_a_batch_in_order_and_checks_lengths(environment):
    env = environment()
    assert env.score(["\\boxed{4}", "5", "x"], ["4", "4", "4"]) == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="2 responses but 1 references"):
        env.score(["1", "2"], ["1"])


def test_scoring_works_off_the_main_thread(environment):
    """Ray may run actor methods off the main thread, where SIGALRM-based timeouts fail."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(math_reward, "\\boxed{0.5}", "1/2").result() == 1.0
        assert pool.submit(environment().score, ["\\boxed{0.5}"], ["1/2"]).result() == [1.0]


def test_an_answer_that_cannot_be_checked_in_time_scores_0_and_the_rest_of_the_batch_is_scored():
    timeout = 2.0
    env = MathEnvironment(timeout, format_reward_weight=0.0)
    try:
        assert env.score(["1"], ["1"]) == [1.0]  # the worker's start-up is charged to no response
        start = time.monotonic()
        grades = env.grade(["\\boxed{4}", PATHOLOGICAL, "12 + 7 = 19", "5"], ["4", "5", "19", "4"])
        elapsed = time.monotonic() - start
        assert env.score(["\\boxed{0.5}"], ["1/2"]) == [1.0]  # the replacement worker serves later batches
    finally:
        env.close()
    assert grades == Grades([1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0], verify_timeouts=1)
    # the limit, then the replacement's start-up (~2 s, more on a busy machine) before the next response
    assert timeout <= elapsed < timeout + 30, elapsed


def test_an_overrunning_call_returns_none_at_its_limit_and_the_next_call_is_served():
    """A single C-level computation (no signal handler runs inside it) is stopped by killing the worker."""
    worker = TimeLimitedWorker(operator.pow, 1.0)
    try:
        assert worker(2, 10) == 1024
        pid = worker._process.pid
        assert worker(3, 3) == 27 and worker._process.pid == pid, "one worker serves every call"
        start = time.monotonic()
        assert worker(9, 9**8) is None  # ~100 s of big-integer arithmetic
        assert 1.0 <= time.monotonic() - start < 3.0
        assert worker(2, 10) == 1024 and worker._process.pid != pid, "the hung worker was replaced"
    finally:
        worker.close()
    assert not worker._process.is_alive()


def test_a_worker_that_dies_mid_call_gives_none_and_is_replaced():
    """What a worker killed for its memory looks like: no result for that call, a fresh worker for the next."""
    worker = TimeLimitedWorker(os._exit, 10.0)
    try:
        start = time.monotonic()
        assert worker(3) is None
        assert time.monotonic() - start < 5.0, "a dead worker is noticed at once, not at the limit"
        assert worker._process.is_alive()
    finally:
        worker.close()


@pytest.mark.parametrize(
    ("response", "score"),
    [
        ("17", 1.0),
        ("", 0.0),
        ("   \n\t", 0.0),  # only whitespace: nothing visible
        ("ab 12", 2 / 4),  # visible "ab12": 2 of 4 characters are a number
        ("no digits at all", 0.0),
        ("-3.5", 1.0),
        ("1/2", 1.0),
        (" 1,000 ", 1.0),
        ("12 + 7 = 19", 6 / 7),  # visible "12+7=19": "12", "+7", "19" cover 6 of 7
        ("The answer is 42.", 2 / 14),  # visible "Theansweris42." has 14 characters
    ],
)
def test_answer_format_score(response, score):
    assert answer_format_score(response) == pytest.approx(score)


def test_format_reward_is_added_with_its_weight(environment):
    env = environment(0.5)
    responses = ["17", "17", "I do not know.", "12 + 7 = 19", "ab 12"]
    references = ["17", "18", "19", "19", "99"]
    # correctness + 0.5 * share of visible characters that are a number
    expected = [1.0 + 0.5, 0.0 + 0.5, 0.0 + 0.0, 1.0 + 0.5 * 6 / 7, 0.0 + 0.5 * 2 / 4]
    assert env.score(responses, references) == pytest.approx(expected)


def test_zero_format_weight_gives_pure_correctness(environment):
    responses = ["17", "17", "ab 12", "12 + 7 = 19"]
    references = ["17", "18", "99", "19"]
    assert environment(0.0).score(responses, references) == [1.0, 0.0, 0.0, 1.0]


def test_grading_keeps_correctness_apart_from_the_format_term(environment):
    """A bare wrong number earns the whole format term: only correctness tells it from a right answer."""
    grades = environment(1.0).grade(["18", "17"], ["17", "17"])
    assert grades.rewards == [1.0, 2.0]
    assert grades.correct == [0.0, 1.0]


GRPO_YAML = Path(__file__).resolve().parents[2] / "examples" / "configs" / "grpo_math.yaml"


def _grpo(*overrides: str):
    return validate_grpo_config(resolve_config(load_config(GRPO_YAML, list(overrides))))


def test_the_verify_timeout_is_a_positive_finite_number_of_seconds():
    assert _grpo().env.math.verify_timeout_s == VERIFY_TIMEOUT_S
    assert _grpo("env.math.verify_timeout_s=1").env.math.verify_timeout_s == 1.0
    assert _grpo("~env.math.verify_timeout_s").env.math.verify_timeout_s == 5.0  # a recipe without the key
    for bad, message in (("0", "greater than 0"), ("-2.5", "greater than 0"), ("inf", "a finite number")):
        with pytest.raises(ConfigError) as info:
            _grpo(f"env.math.verify_timeout_s={bad}")
        (error,) = info.value.messages
        assert error.startswith(f"env.math.verify_timeout_s: Input should be {message}"), error
