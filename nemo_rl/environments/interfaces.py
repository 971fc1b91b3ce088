"""What a rollout algorithm asks of its environment, so GRPO and distillation run on any of them.

An environment judges responses: given a batch of sampled responses and the
reference answers of their prompts it returns one reward per response and a
few batch-level metrics of its own (logged next to the rewards under
``env/``). The run starts it (``make_environment`` reads the recipe's ``env``
block) and shuts it down with everything else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Scores:
    rewards: list[float]  # one per response, in order
    metrics: dict[str, float]  # over the whole batch, e.g. the share answered correctly


class EnvironmentInterface(Protocol):
    def score(self, responses: Sequence[str], references: Sequence[str]) -> Scores:
        """Every response judged against the reference answer of its prompt (``references[i]`` for ``responses[i]``)."""
        ...

    def shutdown(self) -> None:
        """Release the environment's workers; the run calls it once, however it ends."""
        ...
