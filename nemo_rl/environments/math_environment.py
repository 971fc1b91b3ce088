"""Rewards for math answers: the final answer of a response checked against the reference.

Answers are compared as mathematics, not as strings (``0.5`` equals
``\\frac{1}{2}``, ``(x+1)^2`` equals ``x^2+2x+1``), with HuggingFace's
``math-verify`` (LaTeX and plain-expression extraction, sympy equivalence).
A response whose answer cannot be found or parsed, or whose check fails in
any way, scores 0: a malformed sample must cost one reward, never the run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

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


class MathEnvironment:
    """A Ray actor (``ray.remote(MathEnvironment)``) that scores a batch of responses."""

    def score(self, responses: Sequence[str], references: Sequence[str]) -> list[float]:
        if len(responses) != len(references):
            raise ValueError(f"{len(responses)} responses but {len(references)} references")
        return [math_reward(r, ref) for r, ref in zip(responses, references, strict=True)]
