"""What the rollout algorithms ask of their generator, as a Protocol (``VllmGeneration`` implements it).

GRPO and distillation sample with it, refit it from the policy after each
update and, colocated, put it to sleep while the trainer runs. Its prompt
log-probs score given tokens, to compare the generator with the trainer token
by token (after a refit, say). Nothing in it names vLLM, so a test double or
another engine can stand in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from nemo_rl.models.generation.vllm_worker import Completion
from nemo_rl.models.generation.weight_sync import WeightSource


class GenerationInterface(Protocol):
    def generate(
        self, prompts: Sequence[Sequence[int]], seeds: Sequence[int], greedy: bool = False
    ) -> list[Completion]:
        """One completion per prompt, sampled with its own seed (greedy for validation), in prompt order."""
        ...

    def wait_until_started(self) -> None:
        """Block until the engines can serve; construction only launches them, so other workers start meanwhile."""
        ...

    def prompt_logprobs(self, prompts: Sequence[Sequence[int]]) -> list[list[float]]:
        """log p(token t | tokens < t) for t >= 1 of each prompt, from the current weights."""
        ...

    def refit(self, policy: WeightSource) -> int:
        """Load the policy's current weights; returns the number of tensors received."""
        ...

    def wake_up(self) -> None:
        """Take the accelerator memory back before generating (a no-op where the engines do not sleep)."""
        ...

    def sleep(self) -> None:
        """Hand the accelerator memory to the colocated trainer until ``wake_up``."""
        ...

    def shutdown(self) -> None: ...
