"""GRPO on the Megatron policy with vLLM rollouts, driven from one process.

Each step: sample ``num_generations_per_prompt`` responses for each of
``num_prompts_per_step`` prompts with vLLM, score them in the environment,
turn rewards into group-relative advantages, let the trainer recompute the
sampled tokens' log-probabilities (current and reference policy), check them
against the generator's (the parity probe), take the clipped policy-gradient
step(s), and load the new weights into the engines before the next rollout.
The rollout, the probe and the update are the rollout loop's
(``nemo_rl.algorithms.rollout_training``); the advantages, the KL reference
and the clipped loss are GRPO's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from nemo_rl.algorithms.advantages import group_advantages, token_weights
from nemo_rl.algorithms.loss_functions import ClippedPGLoss
from nemo_rl.algorithms.rollout_training import Batch, RolloutResult, RolloutRun, Timer, rollout_batch
from nemo_rl.algorithms.run_setup import run_and_close
from nemo_rl.data.prompt_dataset import PromptSample
from nemo_rl.models.policy.interfaces import PolicyInterface
from nemo_rl.models.policy.lm_policy import Policy


class GRPORun(RolloutRun):
    section = "grpo"
    progress_keys = ("reward_mean", "token_mult_prob_error")

    def make_loss(self) -> ClippedPGLoss:
        lcfg = self.cfg.loss_fn
        return ClippedPGLoss(
            ratio_clip_min=lcfg.ratio_clip_min,
            ratio_clip_max=lcfg.ratio_clip_max,
            reference_policy_kl_penalty=lcfg.reference_policy_kl_penalty,
            importance_sampling_correction=lcfg.use_importance_sampling_correction,
        )

    def start_policy(self) -> PolicyInterface:
        """The trained policy, keeping its starting weights as the KL reference."""
        return self.started(
            Policy(self.cluster, self.cfg.policy, self.model_path, seed=self.loop.seed, init_reference_model=True)
        )

    def chunk_fields(self, chunk: Batch) -> Batch:
        return {"token_weight": token_weights(chunk["loss_mask"], not self.cfg.loss_fn.token_level_loss)}

    def learn(self, samples: list[PromptSample], seeds: list[int], timer: Timer) -> dict[str, float]:
        gcfg, pcfg = self.loop, self.cfg.policy
        responses = self.generate(samples, seeds, False, timer)
        completions, rewards = responses.completions, responses.rewards
        advantages = group_advantages(rewards, gcfg.num_generations_per_prompt, normalize_std=gcfg.normalize_rewards)
        batch = rollout_batch(
            samples, completions, advantages, self.tokenizer.pad_token_id, pcfg.make_sequence_length_divisible_by
        )
        batch["prev_logprobs"], parity = self.trainer_logprobs(batch, timer)
        with timer("logprobs"):
            batch["reference_logprobs"] = self.policy.get_logprobs(batch, self.logprob_batch(), reference=True)
        with timer("training"):
            train = self.optimize(batch)
        lengths = torch.tensor([len(c.token_ids) for c in completions], dtype=torch.float32)
        return {
            "reward_mean": float(rewards.mean()),
            "reward_max": float(rewards.max()),
            "reward_min": float(rewards.min()),
            **responses.logged_environment_metrics(),
            "generation_length_mean": float(lengths.mean()),
            "generation_length_max": float(lengths.max()),
            "truncated_fraction": sum(c.finish_reason == "length" for c in completions) / len(completions),
            "sequence_length_max": int(batch["input_lengths"].max()),
            "token_mult_prob_error": parity,
            **train["metrics"],  # loss, kl, clip_fraction
            "grad_norm": train["grad_norm"],
            "lr": train["lr"],
            **({"packing_efficiency": train["packing_efficiency"]} if "packing_efficiency" in train else {}),
        }

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
