"""Math rewards: equivalence, not string equality; anything malformed scores 0."""

from __future__ import annotations

import pytest

from nemo_rl.environments.math_environment import MathEnvironment, math_reward


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
