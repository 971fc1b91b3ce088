"""Typed, validated run configuration.

A recipe is checked completely before Ray starts or any directory is created,
and every problem (typos, wrong types, out-of-range values, cross-field and
YaRN rules) is reported in one ConfigError, so a long-context job never dies
minutes in on something a glance at the config could have caught.

The sections shared by all algorithms (policy, checkpointing, logger, cluster)
live in `MasterConfig`; an algorithm's master adds its own sections (`sft:`,
`grpo:` with `loss_fn:` and `env:`) and its own rules, and calls `validate_master`.

Models are strict (YAML already gives typed values: `"8"` or `8.0` for a batch
size is a mistake, not something to coerce), frozen, and reject unknown keys.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Annotated, Any, Literal, TypeVar, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from nemo_rl.rope.blocks import OVERRIDES_PATH, YarnScaling
from nemo_rl.rope.megatron_config import megatron_rope_type_errors
from nemo_rl.rope.rules import effective_overrides, requests_yarn, validate_long_context, yarn_scaling
from nemo_rl.utils.errors import ConfigError, nearest_key

logger = logging.getLogger(__name__)


# The RULER tasks nemo_rl.data.ruler implements (its RULER_TASKS has exactly these keys; a test checks it).
RulerTask = Literal["niah_multikey", "variable_tracking"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


# ----------------------------------------------------------------------------
# Shared sections
# ----------------------------------------------------------------------------
class CheckpointingConfig(_Section):
    enabled: bool
    checkpoint_dir: str
    save_period: PositiveInt
    keep_top_k: PositiveInt | None  # most recent step_N directories kept; None keeps all


class TokenizerConfig(_Section):
    name: str


class DTensorConfig(_Section):
    enabled: bool
    activation_checkpointing: bool = False


class TorchOptimizerConfig(_Section):
    """A torch optimizer by dotted name and its keyword arguments (NeMo RL's ``policy.optimizer``)."""

    name: str
    kwargs: dict[str, Any]


class SequencePackingConfig(_Section):
    enabled: bool


class MegatronOptimizerConfig(_Section):
    optimizer: Literal["adam", "sgd"]
    lr: PositiveFloat
    min_lr: NonNegativeFloat
    weight_decay: NonNegativeFloat
    adam_beta1: Annotated[float, Field(ge=0, lt=1)]
    adam_beta2: Annotated[float, Field(ge=0, lt=1)]
    adam_eps: PositiveFloat
    # Shard the fp32 master weights and Adam moments over the data-parallel ranks (ZeRO-1, megatron-core's
    # DistributedOptimizer): gradients are reduce-scattered and the updated weights all-gathered instead.
    use_distributed_optimizer: bool


class MegatronSchedulerConfig(_Section):
    lr_warmup_iters: NonNegativeInt
    lr_warmup_init: NonNegativeFloat
    lr_decay_iters: PositiveInt
    lr_decay_style: Literal["constant", "linear", "cosine"]


class MegatronConfig(_Section):
    enabled: bool
    force_reconvert_from_hf: bool
    tensor_model_parallel_size: PositiveInt
    pipeline_model_parallel_size: PositiveInt
    context_parallel_size: PositiveInt
    sequence_parallel: bool
    activation_checkpointing: bool
    optimizer: MegatronOptimizerConfig
    scheduler: MegatronSchedulerConfig


class GenerationResourcesConfig(_Section):
    gpus_per_node: PositiveInt | None
    num_nodes: PositiveInt | None


class ColocatedConfig(_Section):
    """Generation on the policy's bundles (taking turns with training), or on ``resources`` of its own."""

    enabled: bool
    resources: GenerationResourcesConfig


class GenerationConfig(_Section):
    backend: Literal["vllm"]
    max_new_tokens: PositiveInt
    temperature: NonNegativeFloat
    top_p: Annotated[float, Field(gt=0, le=1)]
    stop_strings: list[str] | None
    colocated: ColocatedConfig
    # Passed to vllm.LLM; RoPE overrides and max_model_len are merged in from the policy (conflicts refused).
    vllm_kwargs: dict[str, Any]
    # Refit moves the weights from the policy workers to the engines in buckets of at most this many MiB
    # (a fused module larger than that travels alone); it bounds the memory a refit takes on either side.
    refit_bucket_mib: PositiveInt = 256
    # How the buckets travel (models.generation.weight_transports): auto is the object store on CPU, CUDA IPC
    # to one colocated engine on a GPU, NCCL broadcast to engines on GPUs of their own; a transport that cannot
    # work where the run is placed (cuda_ipc without CUDA) is refused at start-up.
    refit_transport: Literal["auto", "object_store", "collective", "cuda_ipc"] = "auto"


class PolicyConfig(_Section):
    model_name: str
    tokenizer: TokenizerConfig
    train_global_batch_size: PositiveInt
    train_micro_batch_size: PositiveInt
    max_total_sequence_length: PositiveInt
    precision: Literal["float32", "bfloat16", "float16"]
    make_sequence_length_divisible_by: PositiveInt
    max_grad_norm: NonNegativeFloat  # 0 disables clipping (Megatron's convention)
    # Free-form HF config keys; their meaning (and validation) belongs to nemo_rl.rope.
    hf_config_overrides: dict[str, Any] | None = None
    dtensor_cfg: DTensorConfig
    optimizer: TorchOptimizerConfig | None = None  # the DTensor backend's optimizer
    sequence_packing: SequencePackingConfig
    megatron_cfg: MegatronConfig
    logprob_batch_size: PositiveInt | None = None  # micro-batch of log-prob passes; null: train_micro_batch_size
    generation: GenerationConfig | None = None  # the rollout engine of RL algorithms

    @cached_property
    def effective_hf_config_overrides(self) -> dict[str, Any] | None:
        """What every engine and the checkpoint cache receive (a no-op YaRN block removed)."""
        return effective_overrides(self.hf_config_overrides, self.max_total_sequence_length)

    @cached_property
    def long_context(self) -> YarnScaling | None:
        """The run's YaRN scaling, parsed once, so no other code reads `hf_config_overrides` for it."""
        return yarn_scaling(self.effective_hf_config_overrides)


class WandbConfig(_Section):
    project: str
    name: str


class LoggerConfig(_Section):
    log_dir: str
    tensorboard_enabled: bool
    wandb_enabled: bool
    wandb: WandbConfig
    monitor_gpus: bool


class ClusterConfig(_Section):
    gpus_per_node: PositiveInt  # without CUDA, each "GPU" is one CPU worker process
    num_nodes: PositiveInt


class MasterConfig(_Section):
    """Sections every algorithm shares; algorithm masters subclass it."""

    checkpointing: CheckpointingConfig
    policy: PolicyConfig
    logger: LoggerConfig
    cluster: ClusterConfig


# ----------------------------------------------------------------------------
# Offline algorithms: SFT, DPO, reward modeling
# ----------------------------------------------------------------------------
class OfflineLoopConfig(_Section):
    """The shared loop of algorithms trained on a fixed dataset (``nemo_rl.algorithms.offline_training``)."""

    max_num_epochs: PositiveInt
    max_num_steps: PositiveInt
    val_period: NonNegativeInt  # 0 disables periodic validation
    val_batches: PositiveInt
    val_global_batch_size: PositiveInt
    val_micro_batch_size: PositiveInt
    val_at_start: bool
    seed: int
    export_hf_dir: str | None


class SFTConfig(OfflineLoopConfig):
    """Batch sizes count conversations; the loss is the assistant tokens' NLL."""


class DPOConfig(OfflineLoopConfig):
    """Batch sizes (``policy.train_global_batch_size`` and the val ones) count preference pairs."""

    reference_policy_kl_penalty: PositiveFloat  # DPO's beta
    sft_loss_weight: NonNegativeFloat  # weight of the chosen responses' NLL added to the preference loss
    preference_average_log_probs: bool  # implicit rewards from per-token mean log-probs instead of sums


class RMConfig(OfflineLoopConfig):
    """Batch sizes count preference pairs; the model is the policy's transformer with a scalar head."""


class DataConfig(_Section):
    dataset_name: str
    train_data_path: str | None
    val_data_path: str | None
    shuffle: bool


# Generated on access (needs the tokenizer and a length), so it can only be an extra source of a blend.
SYNTHETIC_RETRIEVAL = "synthetic-retrieval"


class DocumentSourceConfig(_Section):
    """An extra source of a document blend: its chunks hold ``share`` of the training tokens."""

    dataset_name: str  # a built-in name (python-stdlib, synthetic-retrieval) or a label for data_path
    data_path: str | None = None  # JSONL/Parquet of document rows; null: the built-in's train split
    share: Annotated[float, Field(gt=0, lt=1)]
    max_document_tokens: PositiveInt | None = None  # chunk length; null: policy.max_total_sequence_length


class SFTDataConfig(DataConfig):
    """Chat rows (``{"messages"}``, loss on assistant turns) or documents (``{"text"}``, loss on every token)."""

    format: Literal["chat", "document"] = "chat"
    input_key: str = "text"  # the field holding a document's text (NeMo RL's name)
    add_eos: bool = True  # end each document with the tokenizer's eos token
    blend: list[DocumentSourceConfig] = []  # extra training sources of the document format


class LongContextEvalConfig(_Section):
    """Sliding-window perplexity by length, the passkey grid and RULER-style tasks (see nemo_rl.evals.long_context)."""

    enabled: bool
    data_path: str | None  # JSONL/Parquet of {"text"} or {"messages"} rows; null: the caller's default data
    lengths: list[Annotated[int, Field(ge=2)]]  # perplexity context lengths; [] skips perplexity
    stride: PositiveInt | None = None  # sliding-window stride (the YaRN paper: 256); null: half of each length
    document_tokens: PositiveInt | None = None  # each document's scored prefix; null: max(lengths)
    max_documents: PositiveInt = 10  # of those with >= max(lengths) tokens: a seeded sample, used at every length
    passkey_lengths: list[PositiveInt]  # prompt + answer tokens; [] skips the passkey grid
    passkey_depths: list[Annotated[float, Field(ge=0.0, le=1.0)]]
    passkey_trials: PositiveInt  # prompts per (length, depth) cell
    ruler_tasks: list[str] = [
        "niah_multikey",
        "variable_tracking",
    ]  # nemo_rl.data.ruler builds one prompt maker per name
    ruler_lengths: list[PositiveInt] = []  # [] skips the RULER tasks
    ruler_trials: PositiveInt = 10  # prompts per (task, length)
    generation_backend: Literal["hf", "vllm"] = "hf"  # vllm: an in-process engine with the run's RoPE overrides
    batch_size: PositiveInt = 16  # sequences per forward pass (perplexity windows, prompts)
    # After an SFT run: also evaluate the starting model as it ships and with the run's RoPE but no training,
    # and print the three side by side (what the extension and the fine-tuning each bought).
    compare_with_base: bool = False
    seed: int

    @field_validator("stride")
    @classmethod
    def _stride_within_lengths(cls, stride: int | None, info: ValidationInfo) -> int | None:
        lengths = info.data.get("lengths")
        if stride is not None and lengths and stride > min(lengths):
            raise PydanticCustomError(
                "stride_too_long",
                "{stride} is above the shortest of long_context_eval.lengths ({shortest}); windows that far apart "
                "would skip tokens",
                {"stride": stride, "shortest": min(lengths)},
            )
        return stride

    @field_validator("document_tokens")
    @classmethod
    def _documents_hold_every_length(cls, tokens: int | None, info: ValidationInfo) -> int | None:
        lengths = info.data.get("lengths")
        if tokens is not None and lengths and tokens < max(lengths):
            raise PydanticCustomError(
                "document_tokens_too_short",
                "{tokens} is below the longest of long_context_eval.lengths ({longest}); every length must fit "
                "in the scored documents",
                {"tokens": tokens, "longest": max(lengths)},
            )
        return tokens

    @field_validator("ruler_tasks")
    @classmethod
    def _known_ruler_tasks(cls, tasks: list[str]) -> list[str]:
        unknown = [task for task in tasks if task not in get_args(RulerTask)]
        if unknown:
            known = ", ".join(get_args(RulerTask))
            raise PydanticCustomError(
                "ruler_task_unknown", "unknown task {unknown}; known: {known}", {"unknown": unknown[0], "known": known}
            )
        if len(set(tasks)) < len(tasks):
            raise PydanticCustomError("ruler_task_repeated", "a task is listed twice: {tasks}", {"tasks": tasks})
        return tasks


class SFTMasterConfig(MasterConfig):
    sft: SFTConfig
    data: SFTDataConfig
    # Scheduled after training on the exported HF model (needs sft.export_hf_dir).
    long_context_eval: LongContextEvalConfig | None = None


class LongContextEvalRunConfig(_Section):
    """The standalone evaluation command: any HF directory, optionally with RoPE overrides."""

    model_dir: str
    max_total_sequence_length: PositiveInt
    hf_config_overrides: dict[str, Any] | None = None
    output_dir: str
    long_context_eval: LongContextEvalConfig


def validate_long_context_eval_config(resolved: Mapping[str, Any]) -> LongContextEvalRunConfig:
    errors: list[str] = []
    notes: list[str] = []
    max_len = _value(resolved, "max_total_sequence_length", int)
    if max_len is not None:
        # Evaluation runs in transformers, not on a training backend: only the block itself is checked.
        overrides = _value(resolved, "hf_config_overrides", Mapping)
        _, long_errors, notes = validate_long_context(overrides, max_len, True, False)
        errors = [e.replace(OVERRIDES_PATH, "hf_config_overrides") for e in long_errors]
        errors += _eval_length_errors(resolved, max_len)
    return _validated(LongContextEvalRunConfig, resolved, errors, notes)


def _eval_length_errors(raw: Mapping[str, Any], max_len: int) -> list[str]:
    """Evaluation lengths beyond the window the model is configured for (and vLLM's ``max_model_len``)."""
    errors = []
    for key in ("lengths", "passkey_lengths", "ruler_lengths"):
        lengths = [n for n in _value(raw, f"long_context_eval.{key}", list) or [] if isinstance(n, int)]
        if lengths and max(lengths) > max_len:
            errors.append(
                f"long_context_eval.{key}: {max(lengths)} is above max_total_sequence_length = {max_len}, the window "
                "the model is configured (and vLLM sized) for; raise max_total_sequence_length or drop the length"
            )
    return errors


def validate_sft_config(resolved: Mapping[str, Any]) -> SFTMasterConfig:
    """The typed SFT config, or one ConfigError listing every problem in `resolved`."""
    errors = _validation_batch_errors(resolved, "sft") + _document_data_errors(resolved)
    return validate_master(SFTMasterConfig, resolved, errors)


def _document_data_errors(raw: Mapping[str, Any]) -> list[str]:
    """Rules of document data that span fields: blends, chunk lengths, the synthetic source's place."""
    errors = []
    document = _value(raw, "data.format", str) == "document"
    if _value(raw, "data.dataset_name", str) == SYNTHETIC_RETRIEVAL:
        errors.append(
            f"data.dataset_name: {SYNTHETIC_RETRIEVAL} is generated for a blend; name a corpus here (e.g. "
            f"python-stdlib) and add {{dataset_name: {SYNTHETIC_RETRIEVAL}, share: 0.2}} to data.blend"
        )
    blend = _value(raw, "data.blend", list) or []
    if blend and not document:
        errors.append("data.blend: blends are of documents; set data.format=document or remove data.blend")
    shares = [s["share"] for s in blend if isinstance(s, Mapping) and isinstance(s.get("share"), (int, float))]
    if sum(shares) >= 1:
        errors.append(
            f"data.blend: the shares sum to {sum(shares):g}; they must sum to less than 1 (the main "
            "dataset, data.dataset_name, keeps the rest)"
        )
    max_len = _value(raw, "policy.max_total_sequence_length", int)
    for i, source in enumerate(blend):
        if not isinstance(source, Mapping):
            continue
        tokens = source.get("max_document_tokens")
        if isinstance(tokens, int) and max_len is not None and tokens > max_len:
            errors.append(
                f"data.blend.{i}.max_document_tokens: {tokens} is above policy.max_total_sequence_length = "
                f"{max_len}; chunks must fit a training row"
            )
        if source.get("dataset_name") == SYNTHETIC_RETRIEVAL and source.get("data_path") is not None:
            errors.append(f"data.blend.{i}.data_path: {SYNTHETIC_RETRIEVAL} is generated, not read; remove it")
    return errors


def _validation_batch_errors(raw: Mapping[str, Any], section: str) -> list[str]:
    dp = data_parallel_size(raw)
    return batch_errors(raw, f"{section}.val_global_batch_size", f"{section}.val_micro_batch_size", dp)


class DPOMasterConfig(MasterConfig):
    dpo: DPOConfig
    data: DataConfig


class RMMasterConfig(MasterConfig):
    rm: RMConfig
    data: DataConfig


def validate_dpo_config(resolved: Mapping[str, Any]) -> DPOMasterConfig:
    """The typed DPO config, or one ConfigError listing every problem in `resolved`."""
    errors = _validation_batch_errors(resolved, "dpo") + _pairwise_layout_errors(resolved, "DPO")
    return validate_master(DPOMasterConfig, resolved, errors)


def validate_rm_config(resolved: Mapping[str, Any]) -> RMMasterConfig:
    """The typed reward-model config, or one ConfigError listing every problem in `resolved`."""
    errors = _validation_batch_errors(resolved, "rm") + _pairwise_layout_errors(resolved, "reward modeling")
    if _value(resolved, "policy.dtensor_cfg.enabled", bool) is True:
        errors.append(
            "policy.dtensor_cfg.enabled: the reward model's scalar head is built on the Megatron backend; set "
            "policy.dtensor_cfg.enabled=false and policy.megatron_cfg.enabled=true"
        )
    return validate_master(RMMasterConfig, resolved, errors)


def _pairwise_layout_errors(raw: Mapping[str, Any], algorithm: str) -> list[str]:
    """Pairwise losses compare whole sequences, so a pair must sit in one unpacked micro-batch."""
    if _value(raw, "policy.sequence_packing.enabled", bool) is not True:
        return []
    return [
        f"policy.sequence_packing.enabled: {algorithm} compares each chosen sequence with its rejected one in the "
        "same micro-batch, which packing would split; set it to false (context parallelism needs packing, so "
        "scale long sequences with tensor/sequence parallelism here)"
    ]


# ----------------------------------------------------------------------------
# GRPO
# ----------------------------------------------------------------------------
class RolloutLoopConfig(_Section):
    """The loop of algorithms that train on their own vLLM samples (GRPO, on-policy distillation)."""

    num_prompts_per_step: PositiveInt
    max_num_steps: PositiveInt
    max_num_epochs: PositiveInt
    val_period: NonNegativeInt  # 0 disables periodic validation
    val_at_start: bool
    max_val_samples: PositiveInt
    seed: int
    # Step 1 stops when the generator's and the trainer's token probabilities differ by more than this factor.
    token_mult_prob_error_threshold: Annotated[float, Field(ge=1.0)]


class GRPOConfig(RolloutLoopConfig):
    num_generations_per_prompt: Annotated[int, Field(ge=2)]  # group-relative advantages need a group
    normalize_rewards: bool  # divide advantages by the group's reward std


class ClippedPGLossConfig(_Section):
    reference_policy_kl_penalty: NonNegativeFloat
    ratio_clip_min: Annotated[float, Field(ge=0, lt=1)]
    ratio_clip_max: NonNegativeFloat
    token_level_loss: bool  # false: each sequence's token mean counts once
    use_importance_sampling_correction: bool


class MathEnvConfig(_Section):
    num_workers: PositiveInt
    format_reward_weight: NonNegativeFloat  # weight of the answer-format term added to correctness


class EnvConfig(_Section):
    math: MathEnvConfig


class GRPOMasterConfig(MasterConfig):
    grpo: GRPOConfig
    loss_fn: ClippedPGLossConfig
    data: DataConfig
    env: EnvConfig


# ----------------------------------------------------------------------------
# On-policy distillation
# ----------------------------------------------------------------------------
class DistillationConfig(RolloutLoopConfig):
    """GRPO's rollout loop with the teacher's top-k in place of rewards."""

    num_generations_per_prompt: PositiveInt
    topk_logits_k: PositiveInt  # teacher log-probs kept per position


class DistillationLossConfig(_Section):
    kl_type: Literal["forward", "reverse", "mixed"]  # forward: KL(teacher || student)
    mixed_kl_weight: Annotated[float, Field(ge=0, le=1)]  # weight of the forward KL when mixed


class TeacherConfig(_Section):
    """The teacher reads every other key from ``policy`` (RoPE overrides, sequence length, layout)."""

    model_name: str


class DistillationMasterConfig(MasterConfig):
    distillation: DistillationConfig
    loss_fn: DistillationLossConfig
    teacher: TeacherConfig
    data: DataConfig
    env: EnvConfig


def validate_distillation_config(resolved: Mapping[str, Any]) -> DistillationMasterConfig:
    """The typed distillation config, or one ConfigError listing every problem in `resolved`."""
    errors = _rollout_batch_errors(resolved, "distillation", "distillation") + _generation_errors(
        resolved, "distillation", "distillation"
    )
    if _value(resolved, "policy.dtensor_cfg.enabled", bool) is True:
        errors.append(
            "policy.dtensor_cfg.enabled: distillation reads the teacher's top-k from vocab-parallel logits on the "
            "Megatron backend; set policy.dtensor_cfg.enabled=false and policy.megatron_cfg.enabled=true"
        )
    return validate_master(DistillationMasterConfig, resolved, errors)


# vLLM arguments the run sets itself from other keys.
_RUN_OWNED_VLLM_KWARGS = {
    "model": "policy.model_name",
    "dtype": "policy.precision",
    "seed": "{section}.seed",
    "worker_extension_cls": "the weight-refit extension",
    "enable_sleep_mode": "policy.generation.colocated.enabled (sleeps on GPUs when colocated)",
}


def validate_grpo_config(resolved: Mapping[str, Any]) -> GRPOMasterConfig:
    """The typed GRPO config, or one ConfigError listing every problem in `resolved`."""
    errors = _rollout_batch_errors(resolved, "grpo", "GRPO") + _generation_errors(resolved, "grpo", "GRPO")
    if _value(resolved, "policy.generation.temperature", float) == 0.0:
        errors.append(
            "policy.generation.temperature: 0 makes every response of a group identical (advantage 0, nothing "
            "to learn); sample with a temperature > 0 (1.0 matches the policy's own distribution)"
        )
    return validate_master(GRPOMasterConfig, resolved, errors)


def _rollout_batch_errors(raw: Mapping[str, Any], section: str, algorithm: str) -> list[str]:
    prompts = _value(raw, f"{section}.num_prompts_per_step", int)
    group = _value(raw, f"{section}.num_generations_per_prompt", int)
    global_batch = _value(raw, "policy.train_global_batch_size", int)
    if prompts is None or group is None or prompts <= 0 or group <= 0:
        return []
    rollout = prompts * group
    errors = []
    rollout_keys = f"{section}.num_prompts_per_step * {section}.num_generations_per_prompt = {rollout}"
    if global_batch is not None and global_batch > 0 and rollout % global_batch:
        errors.append(
            f"{rollout_keys} must be a multiple of policy.train_global_batch_size = {global_batch} (each "
            f"{algorithm} step takes rollout / global batch optimizer steps)"
        )
    dp = data_parallel_size(raw)
    micro = _value(raw, "policy.logprob_batch_size", int) or _value(raw, "policy.train_micro_batch_size", int)
    if dp is not None and micro is not None and micro > 0 and rollout % (micro * dp):
        errors.append(
            f"{rollout_keys} is not divisible by "
            f"policy.logprob_batch_size (or train_micro_batch_size) * data-parallel size = {micro} * {dp}"
        )
    return errors


def _generation_errors(raw: Mapping[str, Any], section: str, algorithm: str) -> list[str]:
    """The rollout engine's rules (``policy.generation``), for any algorithm that samples with vLLM."""
    if _value(raw, "policy.generation", Mapping) is None:
        return [f"policy.generation: required by {algorithm} (the vLLM rollout engine: backend, max_new_tokens, ...)"]
    errors = []
    max_new = _value(raw, "policy.generation.max_new_tokens", int)
    max_len = _value(raw, "policy.max_total_sequence_length", int)
    if max_new is not None and max_len is not None and max_new >= max_len:
        errors.append(
            f"policy.generation.max_new_tokens: {max_new} leaves no room for a prompt within "
            f"policy.max_total_sequence_length = {max_len}; lower it or raise the sequence length"
        )
    colocated = _value(raw, "policy.generation.colocated.enabled", bool)
    resources = [_value(raw, f"policy.generation.colocated.resources.{k}", int) for k in ("gpus_per_node", "num_nodes")]
    if colocated is True and any(r is not None for r in resources):
        errors.append(
            "policy.generation.colocated.resources: colocated generation uses the policy's bundles; set "
            "gpus_per_node and num_nodes to null, or colocated.enabled=false for engines of their own"
        )
    if colocated is False and any(r is None for r in resources):
        errors.append(
            "policy.generation.colocated.resources: generation on bundles of its own needs gpus_per_node and "
            "num_nodes (one vLLM engine per GPU; on a CPU machine one engine per CPU share)"
        )
    kwargs = _value(raw, "policy.generation.vllm_kwargs", Mapping) or {}
    errors += [
        f"policy.generation.vllm_kwargs.{key}: set by the run from {source.format(section=section)}; remove it here"
        for key, source in _RUN_OWNED_VLLM_KWARGS.items()
        if key in kwargs
    ]
    tp = kwargs.get("tensor_parallel_size", 1)
    if tp != 1:
        errors.append(
            f"policy.generation.vllm_kwargs.tensor_parallel_size: {tp!r}; generation engines are data parallel "
            "(one per GPU bundle) in this version, set it to 1 and scale with more engines"
        )
    return errors


# ----------------------------------------------------------------------------
# Validation shared by every algorithm
# ----------------------------------------------------------------------------
M = TypeVar("M", bound=MasterConfig)


def validate_master(model: type[M], resolved: Mapping[str, Any], algorithm_errors: Sequence[str] = ()) -> M:
    """Field validation plus the shared cross-field rules plus the algorithm's, raised as one error.

    Cross-field rules read the raw dict, not the model, so they still run (and
    report) when an unrelated key has a typo; a rule whose own inputs are
    malformed stays silent, as the field error already covers it.
    """
    long_context_errors, notes = _long_context_rules(resolved)
    rule_errors = _policy_rules(resolved) + long_context_errors + list(algorithm_errors)
    return _validated(model, resolved, rule_errors, notes)


B = TypeVar("B", bound=BaseModel)


def _validated(model: type[B], resolved: Mapping[str, Any], rule_errors: Sequence[str], notes: Sequence[str]) -> B:
    """Field errors and rule errors raised together as one ConfigError; notes logged either way."""
    errors: list[str] = []
    cfg = None
    try:
        cfg = model.model_validate(resolved)
    except ValidationError as err:
        errors += _field_errors(err, model)
    errors += rule_errors
    for note in notes:
        logger.warning(note)
    if errors or cfg is None:
        raise ConfigError(errors)
    return cfg


def _policy_rules(raw: Mapping[str, Any]) -> list[str]:
    dp = data_parallel_size(raw)
    errors = batch_errors(raw, "policy.train_global_batch_size", "policy.train_micro_batch_size", dp)
    errors += _divisible_errors(raw, "policy.max_total_sequence_length", "policy.make_sequence_length_divisible_by")
    errors += _world_size_errors(raw)
    errors += _sequence_layout_errors(raw)
    errors += _backend_errors(raw)
    lr = _value(raw, "policy.megatron_cfg.optimizer.lr", float)
    min_lr = _value(raw, "policy.megatron_cfg.optimizer.min_lr", float)
    if lr is not None and min_lr is not None and min_lr > lr:
        errors.append(
            f"policy.megatron_cfg.optimizer.min_lr: {min_lr} is above lr = {lr}; the schedule would raise the LR"
        )
    return errors


# Megatron-only features: the DTensor worker is data parallel over whole sequences.
_MEGATRON_ONLY = (
    ("policy.megatron_cfg.tensor_model_parallel_size", int, lambda v: v != 1, "1"),
    ("policy.megatron_cfg.pipeline_model_parallel_size", int, lambda v: v != 1, "1"),
    ("policy.megatron_cfg.context_parallel_size", int, lambda v: v != 1, "1"),
    ("policy.megatron_cfg.sequence_parallel", bool, lambda v: v is True, "false"),
    ("policy.sequence_packing.enabled", bool, lambda v: v is True, "false"),
)


def _backend_errors(raw: Mapping[str, Any]) -> list[str]:
    """Exactly one training backend, and only the features it has."""
    megatron = _value(raw, "policy.megatron_cfg.enabled", bool)
    dtensor = _value(raw, "policy.dtensor_cfg.enabled", bool)
    if megatron is None or dtensor is None:
        return []
    if requests_yarn(_value(raw, "policy.hf_config_overrides", Mapping)) and dtensor:
        return []  # the long-context rules name both keys
    if megatron == dtensor:
        state = "both true" if megatron else "both false"
        return [
            f"policy.megatron_cfg.enabled / policy.dtensor_cfg.enabled: {state}; enable exactly one training "
            "backend (Megatron for YaRN, tensor/pipeline/context parallelism and packing; DTensor for the HF model)"
        ]
    if megatron:
        return []
    errors = [
        f"{key}: {value!r} needs the Megatron backend (the DTensor backend is data parallel only); set it to {fix} "
        "or use policy.megatron_cfg.enabled=true"
        for key, kind, unavailable, fix in _MEGATRON_ONLY
        if (value := _value(raw, key, kind)) is not None and unavailable(value)
    ]
    if _value(raw, "policy.optimizer", Mapping) is None:
        errors.append(
            "policy.optimizer: required by the DTensor backend (e.g. name: torch.optim.AdamW, kwargs: {lr: 1e-5})"
        )
    return errors


def _long_context_rules(raw: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    overrides = _value(raw, "policy.hf_config_overrides", Mapping)
    max_len = _value(raw, "policy.max_total_sequence_length", int)
    megatron = _value(raw, "policy.megatron_cfg.enabled", bool)
    dtensor = _value(raw, "policy.dtensor_cfg.enabled", bool)
    if overrides is None or max_len is None or megatron is None or dtensor is None:
        return [], []
    _, errors, notes = validate_long_context(overrides, max_len, megatron, dtensor)
    if megatron and not dtensor:
        errors += megatron_rope_type_errors(overrides)
    return errors, notes


_PARALLEL_KEYS = tuple(
    f"policy.megatron_cfg.{name}"
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size")
)


def data_parallel_size(raw: Mapping[str, Any]) -> int | None:
    """World size / model-parallel size, or None when the inputs are malformed or do not divide."""
    world = _world_size(raw)
    model_parallel = _model_parallel_size(raw)
    if world is None or model_parallel is None or world % model_parallel:
        return None
    return world // model_parallel


def _world_size(raw: Mapping[str, Any]) -> int | None:
    gpus, nodes = _value(raw, "cluster.gpus_per_node", int), _value(raw, "cluster.num_nodes", int)
    if gpus is None or nodes is None or gpus <= 0 or nodes <= 0:
        return None
    return gpus * nodes


def _model_parallel_size(raw: Mapping[str, Any]) -> int | None:
    sizes = [_value(raw, key, int) for key in _PARALLEL_KEYS]
    if any(size is None or size <= 0 for size in sizes):
        return None
    return sizes[0] * sizes[1] * sizes[2]


def _world_size_errors(raw: Mapping[str, Any]) -> list[str]:
    world, model_parallel = _world_size(raw), _model_parallel_size(raw)
    if world is None or model_parallel is None or world % model_parallel == 0:
        return []
    return [
        f"cluster: gpus_per_node * num_nodes = {world} is not divisible by tensor * pipeline * context "
        f"parallel size = {model_parallel} ({', '.join(_PARALLEL_KEYS)})"
    ]


def sequence_multiple(tp: int, cp: int, sequence_parallel: bool) -> int:
    """What every sequence length must be a multiple of for the layout.

    Context parallelism splits each sequence into 2 x CP chunks (each rank takes
    one early and one late chunk, balancing causal attention); sequence
    parallelism splits the sequence dimension over the TP ranks on top of that.
    """
    return (2 * cp if cp > 1 else 1) * (tp if sequence_parallel else 1)


def _sequence_layout_errors(raw: Mapping[str, Any]) -> list[str]:
    tp = _value(raw, "policy.megatron_cfg.tensor_model_parallel_size", int)
    cp = _value(raw, "policy.megatron_cfg.context_parallel_size", int)
    sp = _value(raw, "policy.megatron_cfg.sequence_parallel", bool)
    divisible_by = _value(raw, "policy.make_sequence_length_divisible_by", int)
    if tp is None or cp is None or sp is None or tp <= 0 or cp <= 0:
        return []
    errors = []
    if sp and tp == 1:
        errors.append(
            "policy.megatron_cfg.sequence_parallel: true needs policy.megatron_cfg.tensor_model_parallel_size > 1 "
            "(it splits activations over the TP ranks); set it to false or raise tensor_model_parallel_size"
        )
    packing = _value(raw, "policy.sequence_packing.enabled", bool)
    if cp > 1 and packing is False:
        errors.append(
            f"policy.megatron_cfg.context_parallel_size: {cp} needs sequence packing (each rank holds chunks of "
            "every packed sample, as in megatron-core); set policy.sequence_packing.enabled=true"
        )
    need = sequence_multiple(tp, cp, sp)
    if divisible_by is not None and divisible_by > 0 and divisible_by % need:
        why = " x ".join(
            part
            for part, used in (
                (f"2 x context_parallel_size ({cp})", cp > 1),
                (f"tensor_model_parallel_size ({tp}) with sequence_parallel", sp),
            )
            if used
        )
        errors.append(
            f"policy.make_sequence_length_divisible_by: {divisible_by} must be a multiple of {need} ({why}); "
            f"the smallest valid value is {need}, the nearest above yours {-(-divisible_by // need) * need}"
        )
    return errors


def batch_errors(raw: Mapping[str, Any], global_key: str, micro_key: str, dp: int | None) -> list[str]:
    """Megatron splits a global batch into data-parallel shards of whole micro-batches."""
    errors = _divisible_errors(raw, global_key, micro_key)
    global_size, micro = _value(raw, global_key, int), _value(raw, micro_key, int)
    if errors or dp is None or global_size is None or micro is None or micro <= 0:
        return errors
    if global_size % (micro * dp):
        errors.append(
            f"{global_key}: {global_size} is not divisible by {micro_key} * data-parallel size = {micro} * {dp}"
        )
    return errors


def _divisible_errors(raw: Mapping[str, Any], numerator_key: str, denominator_key: str) -> list[str]:
    numerator, denominator = _value(raw, numerator_key, int), _value(raw, denominator_key, int)
    if numerator is None or denominator is None or denominator <= 0 or numerator % denominator == 0:
        return []
    return [f"{numerator_key}: {numerator} is not divisible by {denominator_key} = {denominator}"]


def _value(raw: Mapping[str, Any], dotted: str, kind: type) -> Any:
    """The value at `dotted` if it has type `kind` (bools are not numbers), else None."""
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    if isinstance(node, bool) and kind is not bool:
        return None
    if kind is float and isinstance(node, int):
        return float(node)
    return node if isinstance(node, kind) else None


# ----------------------------------------------------------------------------
# Pydantic errors as `dotted.key: message` lines
# ----------------------------------------------------------------------------
def _field_errors(err: ValidationError, model: type[BaseModel]) -> list[str]:
    return [_field_error(error, model) for error in err.errors()]


def _field_error(error: Mapping[str, Any], model: type[BaseModel]) -> str:
    loc = [str(part) for part in error["loc"]]
    dotted = ".".join(loc)
    if error["type"] == "extra_forbidden":
        siblings = _field_names(model, loc[:-1])
        match = nearest_key(loc[-1], siblings)
        hint = f"did you mean {'.'.join([*loc[:-1], match])}?" if match else f"valid keys: {', '.join(siblings)}"
        return f"{dotted}: unknown key ({hint})"
    if error["type"] == "missing":
        return f"{dotted}: required key is missing"
    value = error.get("input")
    got = f" (got {value!r})" if value is None or isinstance(value, (bool, int, float, str)) else ""
    return f"{dotted}: {error['msg']}{got}"


def _field_names(model: type[BaseModel], loc: Sequence[str]) -> list[str]:
    """Field names of the nested model at `loc`, to suggest the key a typo meant."""
    for part in loc:
        if part.isdigit():  # an index into a list of sections: the item's model is already `model`
            continue
        field = model.model_fields.get(part)
        nested = _section_model(field.annotation) if field else None
        if nested is None:
            return []
        model = nested
    return list(model.model_fields)


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The section model of a field annotated ``Section``, ``Section | None`` or ``list[Section]``."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None
