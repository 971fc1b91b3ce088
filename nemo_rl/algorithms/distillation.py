"""On-policy distillation on math prompts: the student samples with vLLM, a teacher grades every token.

Each step the student (the trained policy) answers the step's prompts with
vLLM; the teacher, a second Megatron model on the same bundles, scores the
sampled sequences and keeps its top-k next-token log-probs at every response
position; the student takes the step(s) that lower its KL to those
distributions on its own samples. It is GRPO's loop (rollouts, refit, parity
probe, checkpoints, validation) with this step instead of rewards and
advantages; rewards are still computed, as a measure of the student.

Teacher and student read the same ``policy`` block except ``model_name``: the
same RoPE overrides (one YaRN block reaches both and the generator), sequence
length and parallel layout, so the two distributions describe the same
positions. Their tokenizers must agree, which is checked before Ray starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import AutoConfig

from nemo_rl.algorithms.distillation_loss import DistillationLoss
from nemo_rl.algorithms.grpo import Batch, GRPOResult, GRPORun, _Timer, rollout_batch, rollout_seeds
from nemo_rl.algorithms.run_setup import run_and_close
from nemo_rl.data.prompt_dataset import PromptSample
from nemo_rl.models.builtin_models import resolve_model_path
from nemo_rl.models.policy.lm_policy import Policy
from nemo_rl.utils.errors import ConfigError


def check_teacher_compatible(student_dir, teacher_dir, k: int) -> None:
    """The teacher's vocabulary ids must mean what the student's mean, and hold at least ``k`` entries."""
    student, teacher = AutoConfig.from_pretrained(student_dir), AutoConfig.from_pretrained(teacher_dir)
    errors = []
    if student.vocab_size != teacher.vocab_size:
        errors.append(
            f"teacher.model_name: vocabulary of {teacher.vocab_size} entries, the student's has {student.vocab_size}; "
            "distillation compares distributions token id by token id, so pick a teacher of the student's family "
            "(same tokenizer)"
        )
    vocab = min(student.vocab_size, teacher.vocab_size)
    if k > vocab:
        errors.append(f"distillation.topk_logits_k: {k} is more than the vocabulary ({vocab} entries); lower it")
    if errors:
        raise ConfigError(errors)


class DistillationRun(GRPORun):
    section = "distillation"
    trainer_groups = 2  # the student and the teacher share the policy's bundles
    progress_keys = ("kl", "token_mult_prob_error")

    def __init__(self, cfg, resolved_config: dict[str, Any]):
        self.teacher_path = resolve_model_path(cfg.teacher.model_name)
        check_teacher_compatible(
            resolve_model_path(cfg.policy.model_name), self.teacher_path, cfg.distillation.topk_logits_k
        )
        super().__init__(cfg, resolved_config)

    def make_loss(self) -> DistillationLoss:
        return DistillationLoss(kl_type=self.cfg.loss_fn.kl_type, mixed_kl_weight=self.cfg.loss_fn.mixed_kl_weight)

    def start_policy(self) -> Policy:
        """The student, and next to it the teacher: the same policy config with the teacher's weights."""
        student = Policy(self.cluster, self.cfg.policy, self.model_path, seed=self.loop.seed)
        teacher_cfg = self.cfg.policy.model_copy(update={"model_name": self.cfg.teacher.model_name})
        self.teacher = Policy(self.cluster, teacher_cfg, self.teacher_path, seed=self.loop.seed, trainable=False)
        return student

    def chunk_fields(self, chunk: Batch) -> Batch:
        return {}

    def _rollout(self, samples: Sequence[PromptSample], seeds: list[int], greedy: bool, timer: _Timer):
        """Sampled responses, their rewards, and the trainer's rows with the teacher's top-k at every token."""
        completions, rewards = self._generate(samples, seeds, greedy, timer)
        pad, divisible_by = self.tokenizer.pad_token_id, self.cfg.policy.make_sequence_length_divisible_by
        batch = rollout_batch(samples, completions, None, pad, divisible_by)
        with timer("teacher"):
            values, indices = self.teacher.get_topk_logprobs(batch, self.logprob_batch(), self.loop.topk_logits_k)
        return completions, rewards, batch | {"teacher_topk_logprobs": values, "teacher_topk_indices": indices}

    def _step(self, prompts: list[PromptSample], step: int, check_parity: bool) -> dict[str, float]:
        loop = self.loop
        timer = _Timer()
        with timer("step"):
            samples = [prompt for prompt in prompts for _ in range(loop.num_generations_per_prompt)]
            seeds = rollout_seeds(loop.seed, step, len(samples))
            completions, rewards, batch = self._rollout(samples, seeds, False, timer)
            _, parity = self._trainer_logprobs(batch, check_parity, timer)
            with timer("training"):
                train = self._train(batch)
            self.generation_is_stale = True
        m = train["metrics"]
        kl = m["kl_sum"] / max(m["num_tokens"], 1)
        lengths = torch.tensor([len(c.token_ids) for c in completions], dtype=torch.float32)
        return {
            "kl": kl,
            "loss": kl,
            "reward_mean": float(rewards.mean()),
            "generation_length_mean": float(lengths.mean()),
            "sequence_length_max": int(batch["input_lengths"].max()),
            "token_mult_prob_error": parity,
            "grad_norm": train["grad_norm"],
            "lr": train["lr"],
            **{f"timing/{phase}_s": seconds for phase, seconds in timer.seconds.items()},
        }

    def validate(self, step: int) -> dict[str, float] | None:
        """The student's KL to the teacher on its greedy answers to the first ``max_val_samples`` prompts."""
        if self.val_data is None:
            return None
        samples = self.validation_samples()
        timer = _Timer()
        _, rewards, batch = self._rollout(samples, rollout_seeds(self.loop.seed, 0, len(samples)), True, timer)
        metrics = {"reward_mean": float(rewards.mean())}
        rows = len(samples) - len(samples) % (self.policy.dp_size * self.logprob_batch())  # whole micro-batches
        if rows:
            out = self.policy.evaluate({k: v[:rows] for k, v in batch.items()}, self.loss_fn, self.logprob_batch())
            metrics["kl"] = out["metrics"]["kl_sum"] / max(out["metrics"]["num_tokens"], 1)
        self.metrics.log(metrics, step, "validation")
        return metrics

    def close(self) -> None:
        self.teacher.shutdown()
        super().close()


def run_distillation(cfg, resolved_config: dict[str, Any]) -> GRPOResult:
    return run_and_close(DistillationRun, cfg, resolved_config)
