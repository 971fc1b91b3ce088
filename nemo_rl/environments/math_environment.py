"""Rewards for math answers: the final answer of a response checked against the reference.

Answers are compared as mathematics, not as strings (``0.5`` equals
``\\frac{1}{2}``, ``(x+1)^2`` equals ``x^2+2x+1``), with HuggingFace's
``math-verify`` (LaTeX and plain-expression extraction, sympy equivalence).
A response whose answer cannot be found or parsed, or whose check fails in
any way, scores 0: a malformed sample must cost one reward, never the run.

An optional answer-format term rewards responses that are a bare number. It
is dense (a share, not a yes/no), so a model that never answers correctly yet
(the untrained tiny model) still gets a learning signal; recipes that only
want correctness leave its weight at 0.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import ray

from nemo_rl.distributed.sharding import split_evenly
from nemo_rl.environments.interfaces import Scores

logger = logging.getLogger(__name__)


def math_reward(response: str, reference: str) -> float:
    """1.0 if the response's final answer equals ``reference`` mathematically, else 0.0."""
    from math_verify import parse, verify

    try:
        # Timeouts in math-verify use SIGALRM, which only the main thread may set; Ray actors
        # and worker threads are not always that thread, so none is used.
        gold = parse(reference, parsing_timeout=None)
        answer = parse(response, parsing_timeout=None)
        if not gold or not answer:
            return 0.0
        return 1.0 if verify(gold, answer, timeout_seconds=None) else 0.0
    except Exception as error:  # noqa: BLE001 - a bad sample scores 0, whatever went wrong
        logger.debug("math reward: %r scored 0 (%s)", response[:200], error)
        return 0.0


_NUMBER = re.compile(r"[-+]?\d+(?:[.,/]\d+)*")


def answer_format_score(response: str) -> float:
    """Share of the response's non-space characters that are part of a number (1.0 for a bare numeric answer)."""
    visible = "".join(response.split())
    if not visible:
        return 0.0
    return sum(len(match) for match in _NUMBER.findall(visible)) / len(visible)


class MathEnvironment:
    """A Ray actor (``ray.remote(MathEnvironment)``) that scores a batch of responses."""

    def __init__(self, format_reward_weight: float = 0.0):
        self.format_reward_weight = format_reward_weight

    def grade(self, responses: Sequence[str], references: Sequence[str]) -> tuple[list[float], list[float]]:
        """Each response's reward and its correctness (1.0 or 0.0), which the format term hides inside the reward."""
        if len(responses) != len(references):
            raise ValueError(f"{len(responses)} responses but {len(references)} references")
        correct = [math_reward(r, ref) for r, ref in zip(responses, references, strict=True)]
        weight = self.format_reward_weight
        rewards = [c + (weight * answer_format_score(r) if weight else 0) for c, r in zip(correct, responses)]
        return rewards, correct

    def score(self, responses: Sequence[str], references: Sequence[str]) -> list[float]:
        """Each response's reward: correctness plus the weighted format term."""
        return self.grade(responses, references)[0]


class MathEnvironmentPool:
    """The math environment of a run (an ``EnvironmentInterface``): ``num_workers`` actors sharing each batch.

    They reserve no CPU: scoring is light next to generation and training, and
    a run's placement groups already hold the node's cores. Besides the rewards
    it reports ``accuracy``, the share of responses whose answer is correct.
    """

    def __init__(self, num_workers: int, format_reward_weight: float = 0.0):
        actor = ray.remote(MathEnvironment).options(num_cpus=0)
        self.workers = [actor.remote(format_reward_weight) for _ in range(num_workers)]

    def score(self, responses: Sequence[str], references: Sequence[str]) -> Scores:
        shares = zip(
            split_evenly(responses, len(self.workers)), split_evenly(references, len(self.workers)), strict=True
        )
        futures = [w.grade.remote(list(r), list(ref)) for w, (r, ref) in zip(self.workers, shares, strict=True) if r]
        parts = ray.get(futures)
        correct = [c for _, part in parts for c in part]
        return Scores(
            rewards=[reward for part, _ in parts for reward in part],
            metrics={"accuracy": sum(correct) / max(len(correct), 1)},
        )

    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
        self.workers = []
