"""GRPO on the Megatron policy with vLLM rollouts, driven from one process.

Each step: sample ``num_generations_per_prompt`` responses for each of
``num_prompts_per_step`` prompts with vLLM, score them in the environment,
turn rewards into group-relative advantages, let the trainer recompute the
sampled tokens' log-probabilities (current and reference policy), check them
against the generator's (the parity probe), take the clipped policy-gradient
step(s), and load the new weights into the engines before the next rollout.

The driver owns data, rewards, metrics and checkpoints; the workers own the
models. Everything that can be checked without starting Ray is checked first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer

from nemo_rl.algorithms.advantages import group_advantages, token_weights
from nemo_rl.algorithms.logprob_parity import check_first_step, token_mult_prob_error
from nemo_rl.algorithms.loss_functions import ClippedPGLoss
from nemo_rl.algorithms.run_setup import open_run_log, run_and_close
from nemo_rl.data.builtin_datasets import resolve_dataset_paths
from nemo_rl.data.dataloader import ResumableDataloader
from nemo_rl.data.prompt_dataset import PromptSample, load_prompt_dataset
from nemo_rl.data.sft_dataset import SFTSample, collate
from nemo_rl.distributed.ray_init import init_ray
from nemo_rl.distributed.virtual_cluster import RayVirtualCluster
from nemo_rl.environments.math_environment import MathEnvironmentPool
from nemo_rl.models.builtin_models import resolve_model_path
from nemo_rl.models.generation.vllm_generation import VllmGeneration
from nemo_rl.models.generation.vllm_worker import Completion
from nemo_rl.models.policy.lm_policy import Policy, split_rows
from nemo_rl.rope.vllm_engine import vllm_engine_kwargs
from nemo_rl.utils.checkpoint import CheckpointManager, restore_training_state, save_training_state

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


@dataclass
class GRPOResult:
    final_step: int
    last_reward_mean: float
    last_val_reward_mean: float | None
    last_token_mult_prob_error: float
    last_metrics: dict[str, float]  # the last step's metrics


def rollout_seeds(seed: int, step: int, count: int) -> list[int]:
    """One sampling seed per request of a step: a function of (run seed, step, index) only (step 0: validation)."""
    return [int(np.random.SeedSequence([seed, step, i]).generate_state(1)[0]) for i in range(count)]


def rollout_batch(
    samples: Sequence[PromptSample],
    completions: Sequence[Completion],
    advantages: torch.Tensor | None,
    pad_id: int,
    divisible_by: int,
) -> Batch:
    """Prompt + response rows for the trainer, right-padded to a multiple of ``divisible_by``.

    Every per-token field is indexed by the token it describes: ``loss_mask``
    marks the response tokens (the ones the policy chose), the generator's
    log-probability of each sampled token sits at that token, and each
    response token carries its sequence's advantage (when given: distillation has none).
    """
    rows = [
        SFTSample(s.input_ids + c.token_ids, [0] * len(s.input_ids) + [1] * len(c.token_ids))
        for s, c in zip(samples, completions, strict=True)
    ]
    batch = collate(rows, pad_id, divisible_by)
    generation_logprobs = torch.zeros(batch["input_ids"].shape)
    for row, (sample, completion) in enumerate(zip(samples, completions, strict=True)):
        start = len(sample.input_ids)
        generation_logprobs[row, start : start + len(completion.logprobs)] = torch.tensor(completion.logprobs)
    batch["generation_logprobs"] = generation_logprobs
    if advantages is not None:
        batch["advantages"] = batch["loss_mask"] * advantages.float()[:, None]
    return batch


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


class GRPORun:
    """Everything one GRPO run needs, set up in the order that keeps failures cheap.

    On-policy distillation runs the same loop with another step
    (``nemo_rl.algorithms.distillation``); ``section``, ``trainer_groups``
    (models colocated on the policy's bundles besides vLLM) and the hooks
    below are what it changes.
    """

    section = "grpo"
    trainer_groups = 1
    progress_keys = ("reward_mean", "token_mult_prob_error")

    def __init__(self, cfg, resolved_config: dict[str, Any]):
        self.cfg = cfg
        self.loop = getattr(cfg, self.section)
        pcfg, gcfg = cfg.policy, self.loop
        self.model_path = resolve_model_path(pcfg.model_name)
        self.tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(pcfg.tokenizer.name))
        # The generator's arguments, merged with the recipe's own; a contradiction is a ConfigError now, not in Ray.
        vllm_engine_kwargs(
            AutoConfig.from_pretrained(self.model_path),
            pcfg.effective_hf_config_overrides,
            pcfg.max_total_sequence_length,
            pcfg.generation.vllm_kwargs,
        )
        train_path, val_path = resolve_dataset_paths(
            cfg.data.dataset_name, cfg.data.train_data_path, cfg.data.val_data_path
        )
        max_prompt = pcfg.max_total_sequence_length - 1  # room for at least one generated token
        self.train_data = load_prompt_dataset(train_path, self.tokenizer, max_prompt)
        self.val_data = load_prompt_dataset(val_path, self.tokenizer, max_prompt) if val_path else None
        self.train_loader = ResumableDataloader(self.train_data, gcfg.num_prompts_per_step, cfg.data.shuffle, gcfg.seed)

        self.log_dir = Path(cfg.logger.log_dir)
        self.metrics = open_run_log(cfg, resolved_config, ["megatron", "vllm"])
        self.checkpoints = CheckpointManager(Path(cfg.checkpointing.checkpoint_dir), cfg.checkpointing.keep_top_k)

        self._start_workers()
        self.loss_fn = self.make_loss()
        self.generation_is_stale = False  # the engines start from the same HF weights as the policy

    def make_loss(self) -> ClippedPGLoss:
        lcfg = self.cfg.loss_fn
        return ClippedPGLoss(
            ratio_clip_min=lcfg.ratio_clip_min,
            ratio_clip_max=lcfg.ratio_clip_max,
            reference_policy_kl_penalty=lcfg.reference_policy_kl_penalty,
            importance_sampling_correction=lcfg.use_importance_sampling_correction,
        )

    def _start_workers(self) -> None:
        cfg = self.cfg
        gen = cfg.policy.generation
        policy_workers = cfg.cluster.gpus_per_node * cfg.cluster.num_nodes
        if gen.colocated.enabled:
            init_ray(workers=policy_workers)
            self.cluster = RayVirtualCluster(
                cfg.cluster.gpus_per_node, cfg.cluster.num_nodes, max_colocated_worker_groups=self.trainer_groups + 1
            )
            self.generation_cluster = self.cluster
        else:
            res = gen.colocated.resources
            engines = res.gpus_per_node * res.num_nodes
            init_ray(workers=policy_workers + engines)
            share = policy_workers / (policy_workers + engines)  # how a CPU machine's cores are split
            self.cluster = RayVirtualCluster(
                cfg.cluster.gpus_per_node,
                cfg.cluster.num_nodes,
                max_colocated_worker_groups=self.trainer_groups,
                node_share=share,
            )
            self.generation_cluster = RayVirtualCluster(
                res.gpus_per_node, res.num_nodes, name="nemo_rl_generation", node_share=1 - share
            )
        self.policy = self.start_policy()
        self.generation = self._start_generation(cfg.policy)
        self.environment = MathEnvironmentPool(cfg.env.math.num_workers, cfg.env.math.format_reward_weight)

    def start_policy(self) -> Policy:
        """The trained policy, keeping its starting weights as the KL reference."""
        return Policy(self.cluster, self.cfg.policy, self.model_path, seed=self.loop.seed, init_reference_model=True)

    def _start_generation(self, policy_cfg) -> VllmGeneration:
        """The vLLM engines, configured from ``policy_cfg`` (the run's policy config: the same RoPE overrides)."""
        return VllmGeneration(self.generation_cluster, policy_cfg, str(self.model_path), seed=self.loop.seed)

    # ------------------------------------------------------------------
    def _ready_generation(self, timer: _Timer) -> None:
        """Wake the engines and give them the policy's current weights if a training step changed them."""
        with timer("refit"):
            self.generation.wake_up()
            if self.generation_is_stale:
                self.generation.refit(self.policy)
                self.generation_is_stale = False

    def _generate(self, samples: Sequence[PromptSample], seeds: list[int], greedy: bool, timer: _Timer):
        self._ready_generation(timer)
        with timer("generation"):
            completions = self.generation.generate([s.input_ids for s in samples], seeds, greedy=greedy)
            self.generation.sleep()
        with timer("reward"):
            rewards = self.environment.score([c.text for c in completions], [s.answer for s in samples])
        return completions, torch.tensor(rewards, dtype=torch.float32)

    def _step(self, prompts: list[PromptSample], step: int, check_parity: bool) -> dict[str, float]:
        gcfg, pcfg = self.loop, self.cfg.policy
        timer = _Timer()
        with timer("step"):
            group = gcfg.num_generations_per_prompt
            samples = [prompt for prompt in prompts for _ in range(group)]
            completions, rewards = self._generate(samples, rollout_seeds(gcfg.seed, step, len(samples)), False, timer)
            advantages = group_advantages(rewards, group, normalize_std=gcfg.normalize_rewards)
            batch = rollout_batch(
                samples, completions, advantages, self.tokenizer.pad_token_id, pcfg.make_sequence_length_divisible_by
            )
            batch["prev_logprobs"], parity = self._trainer_logprobs(batch, check_parity, timer)
            with timer("logprobs"):
                batch["reference_logprobs"] = self.policy.get_logprobs(batch, self.logprob_batch(), reference=True)
            with timer("training"):
                train = self._train(batch)
            self.generation_is_stale = True
        lengths = torch.tensor([len(c.token_ids) for c in completions], dtype=torch.float32)
        m = train["metrics"]
        tokens = max(m["num_tokens"], 1)
        return {
            "reward_mean": float(rewards.mean()),
            "reward_max": float(rewards.max()),
            "reward_min": float(rewards.min()),
            "generation_length_mean": float(lengths.mean()),
            "generation_length_max": float(lengths.max()),
            "truncated_fraction": sum(c.finish_reason == "length" for c in completions) / len(completions),
            "sequence_length_max": int(batch["input_lengths"].max()),
            "token_mult_prob_error": parity,
            "loss": m["loss_sum"] / tokens,
            "kl": m["kl_sum"] / tokens,
            "clip_fraction": m["clipped_tokens"] / tokens,
            "grad_norm": train["grad_norm"],
            "lr": train["lr"],
            **({"packing_efficiency": m["packing_efficiency"]} if "packing_efficiency" in m else {}),
            **{f"timing/{phase}_s": seconds for phase, seconds in timer.seconds.items()},
        }

    def logprob_batch(self) -> int:
        return self.cfg.policy.logprob_batch_size or self.cfg.policy.train_micro_batch_size

    def _trainer_logprobs(self, batch: Batch, check_parity: bool, timer: _Timer) -> tuple[torch.Tensor, float]:
        """The trainer's log-probs of the sampled tokens, and the parity probe against the generator's.

        ``check_parity`` (the process's first step) stops the run before any
        update when the two engines disagree.
        """
        with timer("logprobs"):
            logprobs = self.policy.get_logprobs(batch, self.logprob_batch())
        parity = token_mult_prob_error(batch["generation_logprobs"], logprobs, batch["loss_mask"])
        if check_parity:
            check_first_step(
                parity, self.loop.token_mult_prob_error_threshold, self.cfg.policy.long_context is not None
            )
        return logprobs, parity

    def validation_samples(self) -> list[PromptSample]:
        """The first ``max_val_samples`` validation prompts (the same ones every time)."""
        return [self.val_data[i] for i in range(min(self.loop.max_val_samples, len(self.val_data)))]

    def _train(self, batch: Batch) -> dict[str, Any]:
        """One optimizer step per ``train_global_batch_size`` rows of the rollout (off-policy after the first)."""
        pcfg = self.cfg.policy
        steps = batch["input_ids"].shape[0] // pcfg.train_global_batch_size
        metrics: dict[str, float] = {}
        results = []
        for chunk in split_rows(batch, steps):
            result = self.policy.train(chunk | self.chunk_fields(chunk), self.loss_fn, pcfg.train_micro_batch_size)
            for key, value in result["metrics"].items():
                metrics[key] = metrics.get(key, 0.0) + value
            results.append(result)
        if "packing_efficiency" in metrics:
            metrics["packing_efficiency"] /= steps
        grad_norm = float(np.mean([r["grad_norm"] for r in results]))
        return {"metrics": metrics, "grad_norm": grad_norm, "lr": results[-1]["lr"]}

    def chunk_fields(self, chunk: Batch) -> Batch:
        """Per-token fields that depend on the optimizer step's rows: the loss's averaging weights."""
        return {"token_weight": token_weights(chunk["loss_mask"], not self.cfg.loss_fn.token_level_loss)}

    def validate(self, step: int) -> dict[str, float] | None:
        """Greedy answers to the first ``max_val_samples`` validation prompts, scored by the environment."""
        if self.val_data is None:
            return None
        samples = self.validation_samples()
        timer = _Timer()
        completions, rewards = self._generate(samples, rollout_seeds(self.loop.seed, 0, len(samples)), True, timer)
        lengths = [len(c.token_ids) for c in completions]
        metrics = {
            "reward_mean": float(rewards.mean()),
            "generation_length_mean": float(np.mean(lengths)),
            **{f"timing/{phase}_s": seconds for phase, seconds in timer.seconds.items()},
        }
        self.metrics.log(metrics, step, "validation")
        return metrics

    def train(self) -> GRPOResult:
        gcfg, ccfg = self.loop, self.cfg.checkpointing
        step = (
            restore_training_state(self.checkpoints, self.policy, self.train_loader, self.metrics)
            if ccfg.enabled
            else 0
        )
        self.generation_is_stale = step > 0  # resumed weights are not the ones the engines loaded
        metrics: dict[str, float] = {"reward_mean": float("nan"), "token_mult_prob_error": float("nan")}
        val_reward = None
        if gcfg.val_at_start and step == 0 and (val := self.validate(0)) is not None:
            val_reward = val["reward_mean"]
        first = True
        with tqdm(total=gcfg.max_num_steps, initial=step, desc=self.section, dynamic_ncols=True) as bar:
            while step < gcfg.max_num_steps and self.train_loader.epoch < gcfg.max_num_epochs:
                prompts = self.train_loader.next_batch()
                metrics = self._step(prompts, step + 1, check_parity=first)
                first = False
                step += 1
                self.metrics.log(metrics, step, "train")
                bar.update(1)
                bar.set_postfix({key: f"{metrics[key]:.4f}" for key in self.progress_keys})
                if gcfg.val_period and step % gcfg.val_period == 0 and (val := self.validate(step)) is not None:
                    val_reward = val["reward_mean"]
                    bar.write(f"step {step}: validation reward {val_reward:.4f}")
                if ccfg.enabled and (step % ccfg.save_period == 0 or step == gcfg.max_num_steps):
                    path = save_training_state(self.checkpoints, step, self.policy, self.tokenizer, self.train_loader)
                    bar.write(f"step {step}: checkpoint {path}")
        return GRPOResult(step, metrics["reward_mean"], val_reward, metrics["token_mult_prob_error"], metrics)

    def close(self) -> None:
        self.metrics.close()
        self.environment.shutdown()
        self.generation.shutdown()
        self.policy.shutdown()
        if self.generation_cluster is not self.cluster:
            self.generation_cluster.shutdown()
        self.cluster.shutdown()


def run_grpo(cfg, resolved_config: dict[str, Any]) -> GRPOResult:
    return run_and_close(GRPORun, cfg, resolved_config)
