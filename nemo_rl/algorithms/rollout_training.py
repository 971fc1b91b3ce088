"""The algorithms that train the policy on its own vLLM samples: GRPO and on-policy distillation.

Each step samples ``num_generations_per_prompt`` responses for each of the
step's prompts with vLLM (after giving the engines the policy's latest
weights), has the environment score them, and hands them to the algorithm,
which builds the trainer's batch and takes the optimizer step(s) with the
pieces here: the trainer's log-probs of the sampled tokens with the parity
probe (on the process's first step, before any update, it stops a run whose
generator and trainer are not the same model) and the update itself.
Set-up order, resume, cadence and progress are the run loop's
(``nemo_rl.algorithms.run_loop``). The driver owns data, rewards, metrics and
checkpoints; the workers own the models. Everything that can be checked
without starting Ray is checked first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from transformers import AutoConfig, AutoTokenizer

from nemo_rl.algorithms.logprob_parity import ParityReport, check_first_step, measure_parity
from nemo_rl.algorithms.run_loop import RunLoop, Timer
from nemo_rl.algorithms.run_setup import resolve_policy_model
from nemo_rl.data.builtin_datasets import resolve_dataset_paths
from nemo_rl.data.dataloader import ResumableDataloader
from nemo_rl.data.prompt_dataset import PromptSample, load_prompt_dataset
from nemo_rl.data.sft_dataset import SFTSample, collate
from nemo_rl.distributed.ray_init import init_ray
from nemo_rl.distributed.virtual_cluster import RayVirtualCluster, has_nodes
from nemo_rl.environments.factory import make_environment
from nemo_rl.environments.interfaces import EnvironmentInterface
from nemo_rl.models.builtin_models import resolve_model_path
from nemo_rl.models.generation.interfaces import GenerationInterface
from nemo_rl.models.generation.vllm_generation import VllmGeneration, engine_tensor_parallel_size
from nemo_rl.models.generation.vllm_worker import Completion
from nemo_rl.models.policy.interfaces import LossFunction, PolicyInterface
from nemo_rl.models.policy.lm_policy import layout_metrics, split_rows
from nemo_rl.models.policy.loss_metrics import add_totals, logged_metrics
from nemo_rl.rope.vllm_engine import vllm_engine_kwargs

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


@dataclass
class RolloutResult:
    final_step: int
    last_reward_mean: float
    last_val_reward_mean: float | None
    last_token_mult_prob_error: float
    last_metrics: dict[str, float]  # the last step's metrics


def rollout_seeds(seed: int, step: int, count: int, start: int = 0) -> list[int]:
    """The seeds of a step's requests ``start`` to ``start + count``: each a function of (run seed, step, index)
    only (step 0: validation), so requests a step adds later (dynamic sampling's) continue the index."""
    return [int(np.random.SeedSequence([seed, step, i]).generate_state(1)[0]) for i in range(start, start + count)]


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


@dataclass
class Responses:
    """One rollout's sampled responses and what the environment made of them."""

    completions: list[Completion]
    rewards: torch.Tensor  # one per completion
    environment_metrics: dict[str, float]

    def logged_environment_metrics(self) -> dict[str, float]:
        return {f"env/{key}": value for key, value in self.environment_metrics.items()}

    def length_metrics(self, samples: Sequence[PromptSample], max_total_sequence_length: int) -> dict[str, float]:
        """Response lengths, and how many were cut: by ``max_new_tokens`` or by the run's window.

        A response whose prompt plus response reaches
        ``policy.max_total_sequence_length`` was stopped by the engine at the
        window (``window_truncated_fraction``), never an error; it is trained on
        as sampled, like any response cut at ``max_new_tokens``.
        """
        lengths = [len(c.token_ids) for c in self.completions]
        at_window = [len(s.input_ids) + n >= max_total_sequence_length for s, n in zip(samples, lengths, strict=True)]
        return {
            "generation_length_mean": float(np.mean(lengths)),
            "generation_length_max": float(max(lengths)),
            "truncated_fraction": sum(c.finish_reason == "length" for c in self.completions) / len(lengths),
            "window_truncated_fraction": sum(at_window) / len(lengths),
        }


class RolloutRun(RunLoop[RolloutResult]):
    """One run of a rollout algorithm.

    Subclasses name their config section, make their loss (``make_loss``),
    start the trained policy and any model beside it (``start_policy``; their
    count besides vLLM is ``trainer_groups``), turn a step's sampled responses
    into an update (``learn``) and say what validation reports (``validate``).
    The engines (``start_generation``) and the environment
    (``start_environment``, from the recipe's ``env`` block) are hooks too.
    """

    engines = ("megatron", "vllm")
    trainer_groups: ClassVar[int] = 1  # models colocated on the policy's bundles besides vLLM
    progress_keys: ClassVar[tuple[str, ...]]  # the step metrics the progress bar shows
    step: int  # the step ``train_step`` is running (``step_requests`` seeds its requests from it)

    def prepare(self) -> ResumableDataloader:
        cfg, pcfg, loop = self.cfg, self.cfg.policy, self.loop
        self.model_path = resolve_policy_model(pcfg)
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
        self.loss_fn = self.make_loss()
        self.generation_is_stale = False  # the engines start from the same HF weights as the policy
        self.parity_checked = False  # the probe stops the run on this process's first step only
        return ResumableDataloader(self.train_data, loop.num_prompts_per_step, cfg.data.shuffle, loop.seed)

    def start_workers(self) -> None:
        """Ray, the clusters, then the models and the environment, each phase timed in ``self.startup``."""
        cfg = self.cfg
        gen = cfg.policy.generation
        policy_workers = cfg.cluster.gpus_per_node * cfg.cluster.num_nodes
        engine_shape = None if gen.colocated.enabled else gen.colocated.resources.shape()
        engines = 0 if engine_shape is None else engine_shape[0] * engine_shape[1]
        with self.startup("ray_init"):
            init_ray(workers=policy_workers + engines)
        with self.startup("clusters"):
            self.reserve_clusters(policy_workers, engine_shape)
        with self.startup("workers"):
            if gen.colocated.enabled and self.cluster.use_gpus:
                self.start_in_turn()
            else:
                self.start_at_once()
        self.log_checkpoint_source()

    def reserve_clusters(self, policy_workers: int, engine_shape: tuple[int, int] | None) -> None:
        """The policy's bundles, and unless colocated (``engine_shape is None``) the engines' own
        (``engine_shape`` = GPUs per node, nodes)."""
        cfg = self.cfg
        if engine_shape is None:
            self.cluster = self.started(
                RayVirtualCluster(
                    cfg.cluster.gpus_per_node,
                    cfg.cluster.num_nodes,
                    max_colocated_worker_groups=self.trainer_groups + 1,
                )
            )
            self.generation_cluster = self.cluster
            return
        # The engines get nodes of their own after the policy's where the Ray cluster has them; otherwise
        # the two clusters share the nodes (a CPU machine's cores split by their number of workers).
        engine_gpus_per_node, engine_nodes = engine_shape
        own_nodes = has_nodes(cfg.cluster.num_nodes + engine_nodes)
        engines = engine_gpus_per_node * engine_nodes
        share = 1.0 if own_nodes else policy_workers / (policy_workers + engines)
        self.cluster = self.started(
            RayVirtualCluster(
                cfg.cluster.gpus_per_node,
                cfg.cluster.num_nodes,
                max_colocated_worker_groups=self.trainer_groups,
                node_share=share,
            )
        )
        tp = engine_tensor_parallel_size(cfg.policy.generation.vllm_kwargs)  # an engine's bundle holds its TP devices
        self.generation_cluster = self.started(
            RayVirtualCluster(
                engine_gpus_per_node // tp,
                engine_nodes,
                name="nemo_rl_generation",
                node_share=1.0 if own_nodes else 1 - share,
                devices_per_bundle=tp,
                first_node=cfg.cluster.num_nodes if own_nodes else 0,
            )
        )

    def start_in_turn(self) -> None:
        """Colocated on GPUs: vLLM measures the GPU's free memory as it starts, so the policy must be loaded by
        then, not loading."""
        with self.startup("policy"):
            self.policy = self.start_policy()
        with self.startup("vllm"):
            self.generation = self.start_generation(self.cfg.policy)
            self.generation.wait_until_started()
        with self.startup("environment"):
            self.environment = self.start_environment()

    def start_at_once(self) -> None:
        """The engines, the policy workers and the environment start together, each timed from its launch until
        it is up (the phases overlap; ``workers`` is their wall time).

        The engines' constructors run in their own processes once launched; the
        policy workers are started and awaited in a thread of the driver while
        its main thread starts the environment and then awaits the engines, so
        neither wait holds up the other and each phase's time is its own. On
        CPU the policy and the engines took 67.7 s one after the other, and the
        environment, started after both, added 4 to 6 s more.
        """
        launched = time.perf_counter()
        self.generation = self.start_generation(self.cfg.policy)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="start-policy") as pool:
            policy = pool.submit(self.timed_start_policy)
            with self.startup("environment"):
                self.environment = self.start_environment()
            self.generation.wait_until_started()
            self.startup.add("vllm", time.perf_counter() - launched)
            self.policy = policy.result()

    def timed_start_policy(self) -> PolicyInterface:
        with self.startup("policy"):
            return self.start_policy()

    # ------------------------------------------------------------ per algorithm
    def make_loss(self) -> LossFunction:
        raise NotImplementedError

    def start_policy(self) -> PolicyInterface:
        """The trained policy on ``self.cluster``, and any model beside it; each passed through ``started``."""
        raise NotImplementedError

    def start_generation(self, policy_cfg) -> GenerationInterface:
        """The vLLM engines, configured from ``policy_cfg`` (the run's policy config: the same RoPE overrides)."""
        return self.started(
            VllmGeneration(self.generation_cluster, policy_cfg, str(self.model_path), seed=self.loop.seed)
        )

    def start_environment(self) -> EnvironmentInterface:
        """What scores the responses: the environment the recipe's ``env`` block configures."""
        return self.started(make_environment(self.cfg.env))

    def learn(self, samples: list[PromptSample], seeds: list[int], timer: Timer) -> dict[str, float]:
        """The algorithm's part of a step: respond to ``samples`` (the step's prompts, each repeated
        ``num_generations_per_prompt`` times in a row) with one seed each, update the policy, report the metrics."""
        raise NotImplementedError

    def chunk_fields(self, chunk: Batch) -> Batch:
        """Per-token fields that depend on the optimizer step's rows (GRPO: the loss's averaging weights)."""
        return {}

    # ----------------------------------------------------- what the hooks use
    def generate(self, samples: Sequence[PromptSample], seeds: list[int], greedy: bool, timer: Timer) -> Responses:
        """The engines' responses to ``samples`` (one seed each) on the policy's current weights, scored."""
        self._ready_generation(timer)
        with timer("generation"):
            completions = self.generation.generate([s.input_ids for s in samples], seeds, greedy=greedy)
            self.generation.sleep()
        with timer("reward"):
            scores = self.environment.score([c.text for c in completions], [s.answer for s in samples])
        return Responses(completions, torch.tensor(scores.rewards, dtype=torch.float32), scores.metrics)

    def _ready_generation(self, timer: Timer) -> None:
        """Wake the engines and give them the policy's current weights if a training step changed them."""
        with timer("refit"):
            self.generation.wake_up()
            if self.generation_is_stale:
                self.generation.refit(self.policy)
                self.generation_is_stale = False

    def logprob_batch(self) -> int:
        return self.cfg.policy.logprob_batch_size or self.cfg.policy.train_micro_batch_size

    def trainer_logprobs(self, batch: Batch, timer: Timer) -> tuple[torch.Tensor, ParityReport]:
        """The trainer's log-probs of the sampled tokens, and the parity probe against the generator's."""
        with timer("logprobs"):
            logprobs = self.policy.get_logprobs(batch, self.logprob_batch())
        return logprobs, self.probe(batch, logprobs)

    def probe(self, batch: Batch, logprobs: torch.Tensor) -> ParityReport:
        """The parity probe of the trainer's ``logprobs`` against the generator's.

        On the process's first step the run stops here, before any update,
        when the two engines disagree.
        """
        parity = measure_parity(batch["generation_logprobs"], logprobs, batch["loss_mask"], self.parity_window())
        if not self.parity_checked:
            self.check_parity(parity)
            self.parity_checked = True
        return parity

    def parity_window(self) -> int:
        """The window the probe's position buckets are multiples of: YaRN's original one, else the whole length."""
        long_context = self.cfg.policy.long_context
        return (
            long_context.original_max_position_embeddings if long_context else self.cfg.policy.max_total_sequence_length
        )

    def check_parity(self, report: ParityReport) -> None:
        """Stop when the first step's parity error is over the threshold this algorithm's section sets."""
        threshold = self.loop.token_mult_prob_error_threshold
        check_first_step(report, threshold, self.cfg.policy.long_context is not None, self.section)

    def optimize(self, batch: Batch) -> dict[str, Any]:
        """One optimizer step per ``train_global_batch_size`` rows of the rollout (off-policy after the first).

        The loss's metrics are logged over the whole rollout (its parts totalled
        over the steps, ``logged_metrics``); the update's and the micro-batch
        layout's (``layout_metrics``) are means over the steps.
        """
        pcfg = self.cfg.policy
        steps = batch["input_ids"].shape[0] // pcfg.train_global_batch_size
        results = [
            self.policy.train(chunk | self.chunk_fields(chunk), self.loss_fn, pcfg.train_micro_batch_size)
            for chunk in split_rows(batch, steps)
        ]
        self.generation_is_stale = True
        out = {
            "metrics": logged_metrics(add_totals(r["metrics"] for r in results), self.loss_fn),
            "grad_norm": float(np.mean([r["grad_norm"] for r in results])),
            "lr": results[-1]["lr"],
        }
        return out | {key: sum(r[key] for r in results) / steps for key in layout_metrics(results[0])}

    def validation_prompts(self) -> tuple[list[PromptSample], list[int]]:
        """The first ``max_val_samples`` validation prompts and their seeds (the same ones every time)."""
        samples = [self.val_data[i] for i in range(min(self.loop.max_val_samples, len(self.val_data)))]
        return samples, rollout_seeds(self.loop.seed, 0, len(samples))

    # ------------------------------------------------------------- loop hooks
    def train_step(self, batch: list, step: int) -> dict[str, float]:
        timer = Timer()
        self.step = step
        with timer("step"):
            metrics = self.learn(*self.step_requests(batch, 0), timer)
        return metrics | timer.metrics()

    def step_requests(self, prompts: Sequence[PromptSample], start: int) -> tuple[list[PromptSample], list[int]]:
        """Each prompt ``num_generations_per_prompt`` times in a row, seeded as the step's requests ``start`` on."""
        samples = [prompt for prompt in prompts for _ in range(self.loop.num_generations_per_prompt)]
        return samples, rollout_seeds(self.loop.seed, self.step, len(samples), start)

    def progress(self, metrics: dict[str, float]) -> dict[str, str]:
        """The algorithm's keys, then the parity per position bucket (7 decimals: float32 engines differ at 1e-7)."""
        shown = {key: f"{metrics[key]:.{7 if key == 'token_mult_prob_error' else 4}f}" for key in self.progress_keys}
        buckets = {key: value for key, value in metrics.items() if key.startswith("token_mult_prob_error/")}
        if len(buckets) > 1:
            shown["by_position"] = " ".join(f"{key.split('/', 1)[1]} {value:.7f}" for key, value in buckets.items())
        return shown

    def describe_validation(self, metrics: dict[str, float]) -> str:
        return f"reward {metrics['reward_mean']:.4f}"

    def load_state(self, directory: Path) -> None:
        super().load_state(directory)
        self.generation_is_stale = True  # resumed weights are not the ones the engines loaded

    def finish(
        self, step: int, last_train: dict[str, float], last_validation: dict[str, float] | None
    ) -> RolloutResult:
        return RolloutResult(
            step,
            last_train.get("reward_mean", float("nan")),
            last_validation["reward_mean"] if last_validation is not None else None,
            last_train.get("token_mult_prob_error", float("nan")),
            last_train,
        )
