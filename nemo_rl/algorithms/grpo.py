"""GRPO on the Megatron policy with vLLM rollouts, driven from one process.

Each step: sample ``num_generations_per_prompt`` responses for each of
``num_prompts_per_step`` prompts with vLLM, score them in the environment,
turn rewards into group-relative advantages, let the trainer recompute the
sampled tokens' log-probabilities (current and reference policy), check them
against the generator's (the parity probe), take the clipped policy-gradient
step(s), and load the new weights into the engines before the next rollout.
The rollout, the probe and the update are the rollout loop's
(``nemo_rl.algorithms.rollout_training``); the advantages, the KL reference
and the clipped loss are GRPO's. DAPO's two options for long generations, both
off by default, sit between scoring and advantages: overlong penalties added
to the rewards (``nemo_rl.algorithms.reward_shaping``) and groups without a
reward signal replaced by new prompts (``nemo_rl.algorithms.dynamic_sampling``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from nemo_rl.algorithms.advantages import group_advantages, token_weights
from nemo_rl.algorithms.dynamic_sampling import DynamicSampling, ScoredBatch
from nemo_rl.algorithms.importance_correction import importance_correction, sequence_ids
from nemo_rl.algorithms.logprob_parity import ParityReport
from nemo_rl.algorithms.loss_functions import ClippedPGLoss
from nemo_rl.algorithms.reward_shaping import OverlongShaping, shaping_metrics
from nemo_rl.algorithms.rollout_training import Batch, Responses, RolloutResult, RolloutRun, Timer, rollout_batch
from nemo_rl.algorithms.run_setup import run_and_close
from nemo_rl.data.dataloader import ResumableDataloader
from nemo_rl.data.prompt_dataset import PromptSample
from nemo_rl.models.policy.interfaces import PolicyInterface
from nemo_rl.models.policy.lm_policy import Policy, layout_metrics


class GRPORun(RolloutRun):
    section = "grpo"
    progress_keys = ("reward_mean", "token_mult_prob_error")

    def make_loss(self) -> ClippedPGLoss:
        lcfg = self.cfg.loss_fn
        return ClippedPGLoss(
            ratio_clip_min=lcfg.ratio_clip_min,
            ratio_clip_max=lcfg.ratio_clip_max,
            reference_policy_kl_penalty=lcfg.reference_policy_kl_penalty,
            importance_correction=importance_correction(lcfg),
            sequence_level_importance_ratios=lcfg.sequence_level_importance_ratios,
        )

    def start_policy(self) -> PolicyInterface:
        """The trained policy, keeping its starting weights as the KL reference."""
        return self.started(
            Policy(self.cluster, self.cfg.policy, self.model_path, seed=self.loop.seed, init_reference_model=True)
        )

    def chunk_fields(self, chunk: Batch) -> Batch:
        """The loss's driver-side fields: averaging weights, the mismatch corrections', GSPO's sequence ids."""
        lcfg = self.cfg.loss_fn
        fields = {"token_weight": token_weights(chunk["loss_mask"], not lcfg.token_level_loss)}
        if (correction := importance_correction(lcfg)) is not None:
            fields |= correction.fields(chunk)
        if lcfg.sequence_level_importance_ratios:
            fields["sequence_id"] = sequence_ids(chunk["loss_mask"])
        return fields

    def prepare(self) -> ResumableDataloader:
        loader = super().prepare()
        self.shaping = OverlongShaping.of(self.loop.reward_shaping, self.cfg.policy.generation.max_new_tokens)
        self.dynamic_sampling = DynamicSampling.of(self.cfg, self.logprob_batch())
        return loader

    def learn(self, samples: list[PromptSample], seeds: list[int], timer: Timer) -> dict[str, float]:
        gcfg, pcfg = self.loop, self.cfg.policy
        responses, first = self.scored_generation(*self.oversampled(samples, seeds), timer)
        trained, sampling_metrics = self.gathered(first, timer)
        advantages = group_advantages(
            trained.rewards, gcfg.num_generations_per_prompt, normalize_std=gcfg.normalize_rewards
        )
        batch = rollout_batch(
            trained.samples,
            trained.completions,
            advantages,
            self.tokenizer.pad_token_id,
            pcfg.make_sequence_length_divisible_by,
        )
        batch["prev_logprobs"], batch["reference_logprobs"], parity = self.scored_with_reference(batch, timer)
        with timer("training"):
            train = self.optimize(batch)
        rewards = responses.rewards  # the environment's, of the first generation batch, as without dynamic sampling
        return {
            "reward_mean": float(rewards.mean()),
            "reward_max": float(rewards.max()),
            "reward_min": float(rewards.min()),
            **responses.logged_environment_metrics(),
            **responses.length_metrics(first.samples, pcfg.max_total_sequence_length),
            **(shaping_metrics(rewards, first.penalties) if self.shaping is not None else {}),
            **sampling_metrics,
            "sequence_length_max": int(batch["input_lengths"].max()),
            **parity.metrics(),  # token_mult_prob_error and generator_kl, overall and per position bucket
            **train["metrics"],  # loss, kl, clip_fraction
            "grad_norm": train["grad_norm"],
            "lr": train["lr"],
            **layout_metrics(train),  # packing_efficiency, or the token budgets' utilisation and micro-batches
        }

    def scored_with_reference(self, batch: Batch, timer: Timer) -> tuple[torch.Tensor, torch.Tensor, ParityReport]:
        """The live and the reference weights' log-probs of the sampled tokens from one policy call, and the
        parity probe of the live ones (which stops a mismatched run on its first step, still before any update).

        ``timing/logprobs_s`` is the call; ``timing/logprobs_policy_s`` and
        ``timing/logprobs_reference_s`` its two passes on the workers.
        """
        with timer("logprobs"):
            scored = self.policy.get_logprobs_with_reference(batch, self.logprob_batch())
        for name, seconds in scored.seconds.items():
            timer.add(f"logprobs_{name}", seconds)
        return scored.policy, scored.reference, self.probe(batch, scored.policy)

    def oversampled(self, samples: list[PromptSample], seeds: list[int]) -> tuple[list[PromptSample], list[int]]:
        """The step's requests, and under dynamic sampling ``batch_multiplier - 1`` more loader batches' after them."""
        if self.dynamic_sampling is None or self.loop.batch_multiplier == 1:
            return samples, seeds
        more_samples, more_seeds = self.more_requests(self.loop.batch_multiplier - 1, len(samples))
        return samples + more_samples, seeds + more_seeds

    def scored_generation(
        self, samples: list[PromptSample], seeds: list[int], timer: Timer
    ) -> tuple[Responses, ScoredBatch]:
        """The responses, and their rewards with reward shaping's overlong penalties (none when it is off)."""
        responses = self.generate(samples, seeds, False, timer)
        lengths = [len(c.token_ids) for c in responses.completions]
        penalties = self.shaping.penalties(lengths) if self.shaping is not None else torch.zeros(len(lengths))
        return responses, ScoredBatch(samples, responses.completions, responses.rewards, penalties)

    def gathered(self, first: ScoredBatch, timer: Timer) -> tuple[ScoredBatch, dict[str, float]]:
        """What the step trains on: ``first``, or what dynamic sampling chose from it and the batches it added."""
        if self.dynamic_sampling is None:
            return first, {}
        return self.dynamic_sampling.gather(first, lambda index: self.refill(index, len(first.samples), timer))

    def more_requests(self, loader_batches: int, start: int) -> tuple[list[PromptSample], list[int]]:
        """The next ``loader_batches`` batches of the run's loader as the step's requests ``start`` on.

        Drawn from the loader the step's own batch came from, so a checkpoint
        records them as used and a resumed run draws what the uninterrupted one did.
        """
        prompts = [prompt for _ in range(loader_batches) for prompt in self.train_loader.next_batch()]
        return self.step_requests(prompts, start)

    def refill(self, index: int, size: int, timer: Timer) -> ScoredBatch:
        """Generation batch ``index`` (1, 2, ...) of dynamic sampling, of ``size`` requests like the first."""
        return self.scored_generation(*self.more_requests(self.loop.batch_multiplier, index * size), timer)[1]

    def validate(self) -> dict[str, float] | None:
        """Greedy answers to the first ``max_val_samples`` validation prompts, scored by the environment."""
        if self.val_data is None:
            return None
        samples, seeds = self.validation_prompts()
        timer = Timer()
        responses = self.generate(samples, seeds, True, timer)
        return {
            "reward_mean": float(responses.rewards.mean()),
            **responses.logged_environment_metrics(),
            "generation_length_mean": float(np.mean([len(c.token_ids) for c in responses.completions])),
            **timer.metrics(),
        }


def run_grpo(cfg, resolved_config: dict[str, Any]) -> RolloutResult:
    return run_and_close(GRPORun, cfg, resolved_config)
