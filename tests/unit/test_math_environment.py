"""Math rewards: equivalence, not string equality; anything malformed scores 0."""

from __future__ import annotations

import pytest

from nemo_rl.environments.math_environment import MathEnvironment, answer_format_score, math_reward


@pytest.mark.parametrize(
    ("response", "reference", "reward"),
    [
        ("So the answer is \\boxed{0.5}.", "\\frac{1}{2}", 1.0),
        ("12 + 7 = 19", "19", 1.0),
        ("The result is \\boxed{(x+1)^2}", "$x^2+2x+1$", 1.0),
        ("12 + 7 = 18", "19", 0.0),
        ("I do not know.", "19", 0.0),
        ("\\boxed{\\frac{1}{", "19", 0.0),  # unbalanced LaTeX
        ("", "19", 0.0),
        ("19", "", 0.0),  # a broken reference never raises either
    ],
)
def test_math_reward(response, reference, reward):
    assert math_reward(response, reference) == reward


def test_environment_scores_a_batch_in_order_and_checks_lengths():
    env = MathEnvironment()
    assert env.score(["\\boxed{4}", "5", "x"], ["4", "4", "4"]) == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="2 responses but 1 references"):
        env.score(["1", "2"], ["1"])


def test_scoring_works_off_the_main_thread():
    """Ray may run actor methods off the main thread, where SIGALRM-based timeouts fail."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(math_reward, "\\boxed{0.5}", "1/2").result() == 1.0


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


def test_format_reward_is_added_with_its_weight():
    env = MathEnvironment(format_reward_weight=0.5)
    responses = ["17", "17", "I do not know.", "12 + 7 = 19", "ab 12"]
    references = ["17", "18", "19", "19", "99"]
    # correctness + 0.5 * share of visible characters that are a number
    expected = [1.0 + 0.5, 0.0 + 0.5, 0.0 + 0.0, 1.0 + 0.5 * 6 / 7, 0.0 + 0.5 * 2 / 4]
    assert env.score(responses, references) == pytest.approx(expected)


def test_zero_format_weight_gives_pure_correctness():
    responses = ["17", "17", "ab 12", "12 + 7 = 19"]
    references = ["17", "18", "99", "19"]
    assert MathEnvironment(format_reward_weight=0.0).score(responses, references) == [1.0, 0.0, 0.0, 1.0]
    assert MathEnvironment().score(responses, references) == [1.0, 0.0, 0.0, 1.0]


def test_grading_keeps_correctness_apart_from_the_format_term():
    """A bare wrong number earns the whole format term: only correctness tells it from a right answer."""
    rewards, correct = MathEnvironment(format_reward_weight=1.0).grade(["18", "17"], ["17", "17"])
    assert rewards == [1.0, 2.0]
    assert correct == [0.0, 1.0]
