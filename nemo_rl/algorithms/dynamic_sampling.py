"""DAPO's dynamic sampling (arXiv 2503.14476, section 3.2): train only on prompt groups that carry a signal.

A group whose responses all got the same reward has advantage 0 for every
response: it adds nothing to the policy gradient, only dilutes the token mean
and spends the step's compute. With ``grpo.use_dynamic_sampling`` a step drops
those groups and generates for more prompts from the run's data loader
(``grpo.batch_multiplier`` loader batches per generation batch) until it has
``num_prompts_per_step`` groups with a signal, or until it has generated
``grpo.dynamic_sampling_max_gen_batches`` batches. Refills advance the
loader like the step's own batch does, so an epoch (``max_num_epochs``) is
used up sooner, and a checkpoint records them as drawn.

What the step trains on (``choose_groups``):

* enough groups: the first ``num_prompts_per_step`` of them, in generation
  order; the rest are discarded;
* the cap reached with fewer: as many of them as make whole optimizer steps
  (and whole log-prob micro-batches on every data-parallel rank), the rest
  discarded; with fewer than that, the first groups without a signal pad them
  to the fewest rows that do. Those padding groups train as plain GRPO trains
  any group (advantage 0: only the KL term), so a step never fails: a resume
  replays the same prompts and seeds, and the cap is part of the run's
  identity, so an error there could not be resumed past.

Which groups were kept, dropped, discarded or padded is logged every step
under ``dynamic_sampling/``. A group's signal is read from the rewards the
advantages are computed from (after reward shaping), so every group kept has
non-zero advantages.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from nemo_rl.config.schema import GRPOMasterConfig
from nemo_rl.data.prompt_dataset import PromptSample
from nemo_rl.distributed.parallel_dims import ParallelDims
from nemo_rl.models.generation.vllm_worker import Completion

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoredBatch:
    """Responses to consecutive groups of requests (a prompt repeated ``group_size`` times), scored."""

    samples: list[PromptSample]
    completions: list[Completion]
    environment_rewards: torch.Tensor  # the environment's, one per response
    penalties: torch.Tensor  # reward shaping's (0 where it is off), one per response

    @property
    def rewards(self) -> torch.Tensor:
        """What the advantages are computed from."""
        return self.environment_rewards + self.penalties

    def groups(self, indices: Sequence[int], group_size: int) -> ScoredBatch:
        """The rows of groups ``indices``, in that order."""
        rows = [group * group_size + k for group in indices for k in range(group_size)]
        return ScoredBatch(
            [self.samples[r] for r in rows],
            [self.completions[r] for r in rows],
            self.environment_rewards[rows],
            self.penalties[rows],
        )

    @staticmethod
    def concat(batches: Sequence[ScoredBatch]) -> ScoredBatch:
        return ScoredBatch(
            [s for b in batches for s in b.samples],
            [c for b in batches for c in b.completions],
            torch.cat([b.environment_rewards for b in batches]),
            torch.cat([b.penalties for b in batches]),
        )


def has_signal(rewards: torch.Tensor, group_size: int) -> list[bool]:
    """Per group of ``group_size`` consecutive rewards: whether they are not all equal."""
    grouped = rewards.view(-1, group_size)
    return (grouped.amax(dim=1) > grouped.amin(dim=1)).tolist()


def choose_groups(signal: Sequence[bool], target: int, whole: int) -> list[int]:
    """The groups a step trains on, in generation order, from each gathered group's ``has_signal``.

    ``target`` groups with a signal when there are that many; else the largest
    multiple of ``whole`` (the fewest groups making whole optimizer steps) of
    them; else all of them, padded to ``whole`` groups with the first groups
    without a signal.
    """
    kept = [i for i, s in enumerate(signal) if s]
    if len(kept) >= target:
        return kept[:target]
    if len(kept) >= whole:
        return kept[: len(kept) // whole * whole]
    padding = [i for i, s in enumerate(signal) if not s][: whole - len(kept)]
    return sorted(kept + padding)


def whole_step_groups(group_size: int, global_batch: int, logprob_rows: int) -> int:
    """The fewest groups whose rows fill whole optimizer steps and whole log-prob passes on every DP rank."""
    rows = math.lcm(global_batch, logprob_rows)
    return rows // math.gcd(rows, group_size)


@dataclass(frozen=True)
class DynamicSampling:
    group_size: int  # grpo.num_generations_per_prompt
    target: int  # grpo.num_prompts_per_step
    whole: int  # whole_step_groups of the run
    max_generation_batches: int  # grpo.dynamic_sampling_max_gen_batches

    @classmethod
    def of(cls, cfg: GRPOMasterConfig, logprob_batch: int) -> DynamicSampling | None:
        """The run's dynamic sampling (a validated GRPO config), or None when ``grpo.use_dynamic_sampling`` is off."""
        loop, policy = cfg.grpo, cfg.policy
        if not loop.use_dynamic_sampling:
            return None
        dp = ParallelDims.from_config(policy, cfg.cluster).dp
        whole = whole_step_groups(loop.num_generations_per_prompt, policy.train_global_batch_size, logprob_batch * dp)
        return cls(
            loop.num_generations_per_prompt, loop.num_prompts_per_step, whole, loop.dynamic_sampling_max_gen_batches
        )

    def gather(
        self, first: ScoredBatch, generate_more: Callable[[int], ScoredBatch]
    ) -> tuple[ScoredBatch, dict[str, float]]:
        """The groups to train on, from ``first`` and as many more generation batches as the target needs.

        ``generate_more(index)`` is generation batch ``index`` (1, 2, ...) of
        the step: new prompts from the run's loader, seeded from the step's
        request index ``index * len(first.samples)`` on, so a resumed step
        draws and samples exactly the same.
        """
        batches = [first]
        signal = has_signal(first.rewards, self.group_size)
        while sum(signal) < self.target and len(batches) < self.max_generation_batches:
            batches.append(generate_more(len(batches)))
            signal += has_signal(batches[-1].rewards, self.group_size)
        chosen = choose_groups(signal, self.target, self.whole)
        trained = ScoredBatch.concat(batches).groups(chosen, self.group_size)
        kept, padded = sum(signal), sum(not signal[i] for i in chosen)
        if kept < self.target:  # the cap was reached
            logger.warning(
                "dynamic sampling: %d of %d prompt groups had a reward signal after %d generation batches "
                "(grpo.dynamic_sampling_max_gen_batches); training on %d groups, %d of them without a signal",
                kept,
                self.target,
                len(batches),
                len(chosen),
                padded,
            )
        return trained, {
            "dynamic_sampling/generation_batches": float(len(batches)),
            "dynamic_sampling/kept_groups": float(kept),
            "dynamic_sampling/dropped_groups": float(len(signal) - kept),
            "dynamic_sampling/trained_groups": float(len(chosen)),
            "dynamic_sampling/discarded_groups": float(kept - (len(chosen) - padded)),
            "dynamic_sampling/padded_groups": float(padded),
            "dynamic_sampling/reward_mean": float(trained.environment_rewards.mean()),
        }
