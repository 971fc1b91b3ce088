"""Rewards for math answers: the final answer of a response checked against the reference.

Answers are compared as mathematics, not as strings (``0.5`` equals
``\\frac{1}{2}``, ``(x+1)^2`` equals ``x^2+2x+1``), with HuggingFace's
``math-verify`` (LaTeX and plain-expression extraction, sympy equivalence).
A response whose answer cannot be found or parsed, or whose check fails in
any way, scores 0: a malformed sample must cost one reward, never the run.
Nor may it cost the step: some answers make the check compute for hours
(``9^{9^{8}}`` against a number: 91 s), so each response is verified in a
worker process under ``env.math.verify_timeout_s`` (``time_limit``); one that
overruns scores 0 and is counted in the ``verify_timeouts`` metric.

An optional answer-format term rewards responses that are a bare number. It
is dense (a share, not a yes/no), so a model that never answers correctly yet
(the untrained tiny model) still gets a learning signal; recipes that only
want correctness leave its weight at 0.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import ray

from nemo_rl.distributed.actor_roster import ActorRoster
from nemo_rl.distributed.sharding import split_evenly
from nemo_rl.distributed.worker_group import wait_until_ready
from nemo_rl.environments.interfaces import Scores
from nemo_rl.environments.time_limit import TimeLimitedWorker

logger = logging.getLogger(__name__)


def math_reward(response: str, reference: str) -> float:
    """1.0 if the response's final answer equals ``reference`` mathematically, else 0.0."""
    from math_verify import parse, verify

    try:
        # math-verify's own timeouts are SIGALRM handlers, which only the main thread may install (a threaded
        # Ray actor is not that thread); the environment bounds each call with a killable process instead.
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


@dataclass(frozen=True)
class Grades:
    """What one environment actor made of its share of a batch."""

    rewards: list[float]  # correctness plus the weighted format term, one per response
    correct: list[float]  # 1.0 or 0.0: the format term hides it inside the reward
    verify_timeouts: int  # responses whose check gave no verdict within the time limit (scored 0)


class MathEnvironment:
    """A Ray actor (``ray.remote(MathEnvironment)``) that scores a batch of responses.

    Its verification worker starts with it and serves every batch; only one
    that overran ``verify_timeout_s`` is killed and replaced.
    """

    def __init__(self, verify_timeout_s: float, format_reward_weight: float = 0.0):
        self.format_reward_weight = format_reward_weight
        self.verify = TimeLimitedWorker(math_reward, verify_timeout_s, warm_up=("1", "1"))

    def grade(self, responses: Sequence[str], references: Sequence[str]) -> Grades:
        """Each response's reward and correctness, and how many checks overran the time limit."""
        if len(responses) != len(references):
            raise ValueError(f"{len(responses)} responses but {len(references)} references")
        verdicts = [self._verdict(r, ref) for r, ref in zip(responses, references, strict=True)]
        correct = [verdict or 0.0 for verdict in verdicts]
        weight = self.format_reward_weight
        rewards = [c + (weight * answer_format_score(r) if weight else 0) for c, r in zip(correct, responses)]
        return Grades(rewards, correct, verify_timeouts=verdicts.count(None))

    def _verdict(self, response: str, reference: str) -> float | None:
        """``math_reward`` under the time limit; None, logged with the response, when the check overran it."""
        verdict = self.verify(response, reference)
        if verdict is None:
            logger.warning("math reward: %r scored 0, its check overran %g s", response[:200], self.verify.timeout_s)
        return verdict

    def score(self, responses: Sequence[str], references: Sequence[str]) -> list[float]:
        """Each response's reward: correctness plus the weighted format term."""
        return self.grade(responses, references).rewards

    def close(self) -> None:
        """Stop the verification worker (an actor killed outright takes it down with it)."""
        self.verify.close()


class MathEnvironmentPool:
    """The math environment of a run (an ``EnvironmentInterface``): ``num_workers`` actors sharing each batch.

    They reserve no CPU: scoring is light next to generation and training, and
    a run's placement groups already hold the node's cores. Besides the rewards
    it reports ``accuracy``, the share of responses whose answer is correct, and
    ``verify_timeouts``, how many responses scored 0 because their check overran
    ``verify_timeout_s``.
    """

    def __init__(self, num_workers: int, verify_timeout_s: float, format_reward_weight: float = 0.0):
        actor = ray.remote(MathEnvironment).options(num_cpus=0)
        self.workers = [actor.remote(verify_timeout_s, format_reward_weight) for _ in range(num_workers)]
        wait_until_ready(self.workers)
        self.roster = ActorRoster("math environment", self.workers)

    def score(self, responses: Sequence[str], references: Sequence[str]) -> Scores:
        shares = zip(
            split_evenly(responses, len(self.workers)), split_evenly(references, len(self.workers)), strict=True
        )
        calls = [
            (rank, worker.grade.remote(list(r), list(ref)))
            for rank, (worker, (r, ref)) in enumerate(zip(self.workers, shares, strict=True))
            if r
        ]
        parts: list[Grades] = self.roster.get([ref for _, ref in calls], [rank for rank, _ in calls])
        correct = [c for part in parts for c in part.correct]
        return Scores(
            rewards=[reward for part in parts for reward in part.rewards],
            metrics={
                "accuracy": sum(correct) / max(len(correct), 1),
                "verify_timeouts": float(sum(part.verify_timeouts for part in parts)),
            },
        )

    def shutdown(self) -> None:
        self.roster.kill_all()  # nothing to release: an actor's verification process dies with it
        self.workers = []
