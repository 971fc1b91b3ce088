"""On-policy distillation on math prompts: the student samples with vLLM, a teacher grades every token.

Each step the student (the trained policy) answers the step's prompts with
vLLM; the teacher, a second Megatron model on the same bundles, scores the
sampled sequences and keeps its top-k next-token log-probs at every response
position; the student takes the step(s) that lower its KL to those
distributions on its own samples. It is the rollout loop GRPO runs (rollouts,
refit, parity probe, checkpoints, validation) with this step instead of rewards
and advantages; rewards are still computed, as a measure of the student.

Teacher and student read the same ``policy`` block except ``model_name``: the
same RoPE overrides (one YaRN block reaches both and the generator), sequence
length and parallel layout, so the two distributions describe the same
positions. Their tokenizers must agree, which is checked before Ray starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from transformers import AutoConfig

from nemo_rl.algorithms.distillation_loss import DistillationLoss
from nemo_rl.algorithms.rollout_training import Batch, Responses, RolloutResult, RolloutRun, Timer, rollout_batch
from nemo_rl.algorithms.run_setup import resolve_policy_model, run_and_close
from nemo_rl.data.dataloader import ResumableDataloader
from nemo_rl.data.prompt_dataset import PromptSample
from nemo_rl.models.builtin_models import resolve_model_path
from nemo_rl.models.policy.interfaces import PolicyInterface
from nemo_rl.models.policy.lm_policy import Policy, layout_metrics
from nemo_rl.models.policy.loss_metrics import logged_metrics
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


class DistillationRun(RolloutRun):
    section = "distillation"
    trainer_groups = 2  # the student and the teacher share the policy's bundles
    progress_keys = ("kl", "token_mult_prob_error")
    teacher: PolicyInterface  # forward-only: the top-k log-probs of every sampled token (set by ``start_policy``)

    def prepare(self) -> ResumableDataloader:
        self.teacher_path = resolve_policy_model(self.cfg.policy, self.cfg.teacher.model_name, "teacher.model_name")
        check_teacher_compatible(
            resolve_model_path(self.cfg.policy.model_name), self.teacher_path, self.loop.topk_logits_k
        )
        return super().prepare()

    def make_loss(self) -> DistillationLoss:
        return DistillationLoss(kl_type=self.cfg.loss_fn.kl_type, mixed_kl_weight=self.cfg.loss_fn.mixed_kl_weight)

    def start_policy(self) -> PolicyInterface:
        """The student, and next to it the teacher (the same policy config with the teacher's weights), started
        together: each waits mostly on its own processes' imports and loading, so one after the other would add
        the two. A model that fails to start is named; the other is still shut down with the run."""
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="start-teacher") as pool:
            teacher = pool.submit(self.start_teacher)
            student = self.started(Policy(self.cluster, self.cfg.policy, self.model_path, seed=self.loop.seed))
            self.teacher = teacher.result()
        return student

    def start_teacher(self) -> PolicyInterface:
        teacher_cfg = self.cfg.policy.model_copy(update={"model_name": self.cfg.teacher.model_name})
        return self.started(
            Policy(
                self.cluster,
                teacher_cfg,
                self.teacher_path,
                seed=self.loop.seed,
                trainable=False,
                role="teacher worker",
            )
        )

    def graded_rollout(
        self, samples: Sequence[PromptSample], seeds: list[int], greedy: bool, timer: Timer
    ) -> tuple[Responses, Batch]:
        """Sampled responses with their rewards, and the trainer's rows with the teacher's top-k at every token."""
        responses = self.generate(samples, seeds, greedy, timer)
        pad, divisible_by = self.tokenizer.pad_token_id, self.cfg.policy.make_sequence_length_divisible_by
        batch = rollout_batch(samples, responses.completions, None, pad, divisible_by)
        with timer("teacher"):
            values, indices = self.teacher.get_topk_logprobs(batch, self.logprob_batch(), self.loop.topk_logits_k)
        return responses, batch | {"teacher_topk_logprobs": values, "teacher_topk_indices": indices}

    def learn(self, samples: list[PromptSample], seeds: list[int], timer: Timer) -> dict[str, float]:
        responses, batch = self.graded_rollout(samples, seeds, False, timer)
        _, parity = self.trainer_logprobs(batch, timer)
        with timer("training"):
            train = self.optimize(batch)
        return {
            **train["metrics"],  # kl, and the same value as loss
            "reward_mean": float(responses.rewards.mean()),
            **responses.logged_environment_metrics(),
            **responses.length_metrics(samples, self.cfg.policy.max_total_sequence_length),
            "sequence_length_max": int(batch["input_lengths"].max()),
            **parity.metrics(),  # token_mult_prob_error and generator_kl, overall and per position bucket
            "grad_norm": train["grad_norm"],
            "lr": train["lr"],
            **layout_metrics(train),
        }

    def validate(self) -> dict[str, float] | None:
        """The student's KL to the teacher on its greedy answers to the first ``max_val_samples`` prompts."""
        if self.val_data is None:
            return None
        samples, seeds = self.validation_prompts()
        responses, batch = self.graded_rollout(samples, seeds, True, Timer())
        metrics = {"reward_mean": float(responses.rewards.mean()), **responses.logged_environment_metrics()}
        rows = len(samples) - len(samples) % (self.policy.dims.dp * self.logprob_batch())  # whole micro-batches
        if rows:
            out = self.policy.evaluate({k: v[:rows] for k, v in batch.items()}, self.loss_fn, self.logprob_batch())
            metrics["kl"] = logged_metrics(out["metrics"], self.loss_fn)["kl"]
        return metrics


def run_distillation(cfg, resolved_config: dict[str, Any]) -> RolloutResult:
    return run_and_close(DistillationRun, cfg, resolved_config)
