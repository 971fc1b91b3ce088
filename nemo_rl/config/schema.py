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

Cross-field rules are functions of the typed config. When some field is invalid
they run over a lenient build (every field that validates on its own, the rest
unset), so they still report alongside the field errors; a rule that reads an
unset field is skipped, its input's own error already covering it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from functools import cache, cached_property, partial
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, TypeVar, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from nemo_rl.distributed.parallel_dims import ParallelDims
from nemo_rl.rope.blocks import OVERRIDES_PATH, YarnScaling
from nemo_rl.rope.megatron_config import megatron_rope_type_errors
from nemo_rl.rope.rules import effective_overrides, requests_yarn, validate_long_context, yarn_scaling
from nemo_rl.utils.errors import ConfigError, nearest_key

logger = logging.getLogger(__name__)


# The RULER tasks nemo_rl.data.ruler implements (its RULER_TASKS has exactly these keys; a test checks it).
RulerTask = Literal["niah_multikey", "variable_tracking"]


class UnsetField(AttributeError):
    """A field the lenient build left unset because its value is missing or invalid (see `validate_master`)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    if not TYPE_CHECKING:  # hidden from the type checker, which keeps flagging names that are no field

        def __getattr__(self, name: str) -> Any:
            # Only a field can be unset; any other name (a renamed field a rule still reads) stays an AttributeError.
            if name in type(self).model_fields:
                raise UnsetField(f"{type(self).__name__}.{name}")
            return super().__getattr__(name)


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


class DynamicBatchingConfig(_Section):
    """Token-budget micro-batches (NeMo RL's names): each DP shard's rows sorted by length and grouped while
    rows x the group's longest row (rounded up to ``sequence_length_round``) stays within a budget of tokens,
    in place of ``train_micro_batch_size`` and ``logprob_batch_size`` (``nemo_rl.models.policy.micro_batches``)."""

    enabled: bool
    train_mb_tokens: PositiveInt  # budget of the loss passes (training and validation)
    logprob_mb_tokens: PositiveInt  # budget of the forward passes (log-probs, a teacher's top-k, scores)
    sequence_length_round: PositiveInt  # micro-batch lengths are rounded up to a multiple of this


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

    def shape(self) -> tuple[int, int]:
        """(gpus_per_node, num_nodes) of engines on bundles of their own, where validation has required both."""
        if self.gpus_per_node is None or self.num_nodes is None:
            raise ValueError("policy.generation.colocated.resources: gpus_per_node and num_nodes must both be set")
        return self.gpus_per_node, self.num_nodes


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
    dynamic_batching: DynamicBatchingConfig
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

    # Training rows one sample of the algorithm's batch becomes (a preference pair: chosen and rejected).
    rows_per_sample: ClassVar[int] = 1
    # Whether the policy keeps its starting weights to score with (DPO's and GRPO's reference model).
    keeps_reference_model: ClassVar[bool] = False

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
    cfg, errors = _typed(LongContextEvalRunConfig, resolved)
    long_errors, notes = _or_none(lambda: _eval_long_context(cfg)) or ([], [])
    errors += long_errors + _apply(_EVAL_LENGTH_RULES, cfg)
    return _reported(cfg, errors, notes)


def _eval_long_context(cfg: LongContextEvalRunConfig) -> tuple[list[str], list[str]]:
    """Evaluation runs in transformers, not on a training backend: only the block itself is checked."""
    _, errors, notes = validate_long_context(cfg.hf_config_overrides, cfg.max_total_sequence_length, True, False)
    return [e.replace(OVERRIDES_PATH, "hf_config_overrides") for e in errors], notes


def _eval_length_errors(key: str, lengths: list[int], max_len: int) -> list[str]:
    """Evaluation lengths beyond the window the model is configured for (and vLLM's ``max_model_len``)."""
    if not lengths or max(lengths) <= max_len:
        return []
    return [
        f"long_context_eval.{key}: {max(lengths)} is above max_total_sequence_length = {max_len}, the window "
        "the model is configured (and vLLM sized) for; raise max_total_sequence_length or drop the length"
    ]


_EVAL_LENGTH_RULES: tuple[Callable[[LongContextEvalRunConfig], list[str]], ...] = (
    lambda c: _eval_length_errors("lengths", c.long_context_eval.lengths, c.max_total_sequence_length),
    lambda c: _eval_length_errors("passkey_lengths", c.long_context_eval.passkey_lengths, c.max_total_sequence_length),
    lambda c: _eval_length_errors("ruler_lengths", c.long_context_eval.ruler_lengths, c.max_total_sequence_length),
)


def validate_sft_config(resolved: Mapping[str, Any]) -> SFTMasterConfig:
    """The typed SFT config, or one ConfigError listing every problem in `resolved`."""
    return validate_master(
        SFTMasterConfig,
        resolved,
        (
            lambda cfg: _validation_batch_errors(cfg, cfg.sft, "sft"),
            _synthetic_main_dataset_errors,
            _blend_format_errors,
            _blend_share_errors,
            _blend_source_errors,
        ),
    )


def _synthetic_main_dataset_errors(cfg: SFTMasterConfig) -> list[str]:
    if cfg.data.dataset_name != SYNTHETIC_RETRIEVAL:
        return []
    return [
        f"data.dataset_name: {SYNTHETIC_RETRIEVAL} is generated for a blend; name a corpus here (e.g. "
        f"python-stdlib) and add {{dataset_name: {SYNTHETIC_RETRIEVAL}, share: 0.2}} to data.blend"
    ]


def _blend_format_errors(cfg: SFTMasterConfig) -> list[str]:
    if not cfg.data.blend or cfg.data.format == "document":
        return []
    return ["data.blend: blends are of documents; set data.format=document or remove data.blend"]


def _blend_share_errors(cfg: SFTMasterConfig) -> list[str]:
    total = sum(source.share for source in cfg.data.blend)
    if total < 1:
        return []
    return [
        f"data.blend: the shares sum to {total:g}; they must sum to less than 1 (the main "
        "dataset, data.dataset_name, keeps the rest)"
    ]


def _blend_source_errors(cfg: SFTMasterConfig) -> list[str]:
    """Each source's chunks fit a training row, and the generated source reads no file."""
    errors = []
    max_len = _or_none(lambda: cfg.policy.max_total_sequence_length)
    for i, source in enumerate(cfg.data.blend):
        tokens = source.max_document_tokens
        if tokens is not None and max_len is not None and tokens > max_len:
            errors.append(
                f"data.blend.{i}.max_document_tokens: {tokens} is above policy.max_total_sequence_length = "
                f"{max_len}; chunks must fit a training row"
            )
        if source.dataset_name == SYNTHETIC_RETRIEVAL and source.data_path is not None:
            errors.append(f"data.blend.{i}.data_path: {SYNTHETIC_RETRIEVAL} is generated, not read; remove it")
    return errors


def _validation_batch_errors(cfg: MasterConfig, loop: OfflineLoopConfig, section: str) -> list[str]:
    return batch_errors(
        (f"{section}.val_global_batch_size", loop.val_global_batch_size),
        (f"{section}.val_micro_batch_size", loop.val_micro_batch_size),
        _data_parallel_size(cfg),
    )


class DPOMasterConfig(MasterConfig):
    rows_per_sample: ClassVar[int] = 2
    keeps_reference_model: ClassVar[bool] = True
    dpo: DPOConfig
    data: DataConfig


class RMMasterConfig(MasterConfig):
    rows_per_sample: ClassVar[int] = 2
    rm: RMConfig
    data: DataConfig


def validate_dpo_config(resolved: Mapping[str, Any]) -> DPOMasterConfig:
    """The typed DPO config, or one ConfigError listing every problem in `resolved`."""
    return validate_master(
        DPOMasterConfig,
        resolved,
        (lambda cfg: _validation_batch_errors(cfg, cfg.dpo, "dpo"), lambda cfg: _pairwise_layout_errors(cfg, "DPO")),
    )


def validate_rm_config(resolved: Mapping[str, Any]) -> RMMasterConfig:
    """The typed reward-model config, or one ConfigError listing every problem in `resolved`."""
    return validate_master(
        RMMasterConfig,
        resolved,
        (
            lambda cfg: _validation_batch_errors(cfg, cfg.rm, "rm"),
            lambda cfg: _pairwise_layout_errors(cfg, "reward modeling"),
            _reward_head_backend_errors,
        ),
    )


def _reward_head_backend_errors(cfg: RMMasterConfig) -> list[str]:
    if not cfg.policy.dtensor_cfg.enabled:
        return []
    return [
        "policy.dtensor_cfg.enabled: the reward model's scalar head is built on the Megatron backend; set "
        "policy.dtensor_cfg.enabled=false and policy.megatron_cfg.enabled=true"
    ]


def _pairwise_layout_errors(cfg: MasterConfig, algorithm: str) -> list[str]:
    """Pairwise losses compare whole sequences, so a pair must sit in one unpacked micro-batch."""
    if not cfg.policy.sequence_packing.enabled:
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


class RewardShapingConfig(_Section):
    """DAPO's soft overlong punishment (NeMo RL's names), added to the rewards before advantages
    (``nemo_rl.algorithms.reward_shaping``): 0 up to ``max_response_length - overlong_buffer_length`` tokens,
    falling linearly to ``-overlong_buffer_penalty`` at ``max_response_length``, that beyond."""

    enabled: bool = False
    overlong_buffer_length: PositiveInt | None = None  # required when enabled
    overlong_buffer_penalty: PositiveFloat = 1.0
    max_response_length: PositiveInt | None = None  # null: policy.generation.max_new_tokens


class GRPOConfig(RolloutLoopConfig):
    num_generations_per_prompt: Annotated[int, Field(ge=2)]  # group-relative advantages need a group
    normalize_rewards: bool  # divide advantages by the group's reward std
    # DAPO's dynamic sampling (nemo_rl.algorithms.dynamic_sampling): drop the prompt groups whose rewards are all
    # equal and refill the step from the loader, generating at most dynamic_sampling_max_gen_batches batches of
    # batch_multiplier loader batches each.
    use_dynamic_sampling: bool = False
    dynamic_sampling_max_gen_batches: PositiveInt = 10
    batch_multiplier: PositiveInt = 1  # loader batches per generation batch (NeMo RL's is a float; whole here)
    reward_shaping: RewardShapingConfig = RewardShapingConfig()


class ClippedPGLossConfig(_Section):
    """GRPO's loss (``ClippedPGLoss``); DAPO's decoupled clip is ``ratio_clip_max > ratio_clip_min``.

    The generator/trainer mismatch corrections (``importance_correction``) are
    off unless set; NeMo RL's names where it has them.
    """

    reference_policy_kl_penalty: NonNegativeFloat
    ratio_clip_min: Annotated[float, Field(ge=0, lt=1)]
    ratio_clip_max: NonNegativeFloat
    token_level_loss: bool  # false: each sequence's token mean counts once
    use_importance_sampling_correction: bool  # weight each loss token by exp(prev_logprobs - generation_logprobs)
    importance_sampling_level: Literal["token", "sequence"] = "token"  # sequence: the product over the sequence
    truncated_importance_sampling_ratio: PositiveFloat | None = None  # TIS: the weight capped at this
    # Drop tokens (ICE-POP) or whole sequences (by the geometric mean) whose ratio is outside [min, max].
    importance_sampling_mask: Literal["token", "sequence"] | None = None
    importance_sampling_mask_min: PositiveFloat = 0.5
    importance_sampling_mask_max: PositiveFloat = 2.0
    sequence_level_importance_ratios: bool = False  # GSPO: one clipped ratio per sequence


def _importance_weight_errors(cfg: GRPOMasterConfig) -> list[str]:
    """The weight's options need the weight, and a sequence's product of ratios needs a cap."""
    loss, errors = cfg.loss_fn, []
    cap, weighted = loss.truncated_importance_sampling_ratio, loss.use_importance_sampling_correction
    if cap is not None and not weighted:
        errors.append(
            "loss_fn.truncated_importance_sampling_ratio: caps the importance weights, and "
            "loss_fn.use_importance_sampling_correction = false applies none; set it to true, or the ratio to null"
        )
    if cap is not None and cap < 1:
        errors.append(
            f"loss_fn.truncated_importance_sampling_ratio: {cap} is below 1, so it caps even the tokens both "
            "engines score alike (ratio 1); use a cap of at least 1 (e.g. 2.0)"
        )
    if loss.importance_sampling_level == "sequence" and not weighted:
        errors.append(
            "loss_fn.importance_sampling_level: sequence with loss_fn.use_importance_sampling_correction = false "
            "has no weight to compute; set it to true, or the level to token"
        )
    elif loss.importance_sampling_level == "sequence" and cap is None:
        errors.append(
            "loss_fn.importance_sampling_level: sequence weights a sequence by the product of its tokens' ratios, "
            "which grows exponentially with its length; cap it with loss_fn.truncated_importance_sampling_ratio "
            "(e.g. 2.0)"
        )
    return errors


def _importance_mask_errors(cfg: GRPOMasterConfig) -> list[str]:
    """The mask's bounds keep on-policy tokens, and the mask agrees with the weight it multiplies."""
    loss, errors = cfg.loss_fn, []
    if loss.importance_sampling_mask is None:
        return []
    low, high = loss.importance_sampling_mask_min, loss.importance_sampling_mask_max
    if not low <= 1 <= high or low >= high:
        errors.append(
            f"loss_fn.importance_sampling_mask_min, loss_fn.importance_sampling_mask_max: [{low}, {high}] must "
            "contain 1 (the ratio of a token both engines score alike) with min < max, or the mask drops "
            "on-policy tokens; e.g. 0.5 and 2.0"
        )
    if loss.importance_sampling_mask != "token" or not loss.use_importance_sampling_correction:
        return errors
    cap = loss.truncated_importance_sampling_ratio
    if loss.importance_sampling_level == "sequence":
        errors.append(
            "loss_fn.importance_sampling_mask: token drops single tokens, and loss_fn.importance_sampling_level = "
            "sequence weights a sequence by the product over all its tokens; mask sequences "
            "(importance_sampling_mask=sequence) or weight tokens (importance_sampling_level=token)"
        )
    elif cap is not None and cap >= high:
        errors.append(
            f"loss_fn.truncated_importance_sampling_ratio: {cap} is not below loss_fn.importance_sampling_mask_max "
            f"= {high}; the token mask drops every token whose ratio exceeds {high}, so the cap never applies; "
            "lower the cap below the mask's max, or set it to null"
        )
    return errors


def _sequence_ratio_errors(cfg: GRPOMasterConfig) -> list[str]:
    if not (cfg.loss_fn.sequence_level_importance_ratios and cfg.loss_fn.token_level_loss):
        return []
    return [
        "loss_fn.sequence_level_importance_ratios: GSPO clips and averages per sequence (each sequence's loss "
        "counts once), and loss_fn.token_level_loss = true weighs sequences by their length; set "
        "loss_fn.token_level_loss=false"
    ]


class MathEnvConfig(_Section):
    num_workers: PositiveInt
    format_reward_weight: NonNegativeFloat  # weight of the answer-format term added to correctness
    # Seconds one response's answer check may take (math-verify's own default limit); one that overruns is
    # scored 0 and counted in env/verify_timeouts, and its worker process is killed and replaced.
    verify_timeout_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 5.0


class EnvConfig(_Section):
    math: MathEnvConfig


class GRPOMasterConfig(MasterConfig):
    keeps_reference_model: ClassVar[bool] = True
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
    return validate_master(
        DistillationMasterConfig,
        resolved,
        (
            lambda cfg: _rollout_global_batch_errors(cfg, cfg.distillation, "distillation", "distillation"),
            lambda cfg: _rollout_logprob_batch_errors(cfg, cfg.distillation, "distillation"),
            *_generation_rules("distillation", "distillation"),
            _teacher_backend_errors,
        ),
    )


def _teacher_backend_errors(cfg: DistillationMasterConfig) -> list[str]:
    if not cfg.policy.dtensor_cfg.enabled:
        return []
    return [
        "policy.dtensor_cfg.enabled: distillation reads the teacher's top-k from vocab-parallel logits on the "
        "Megatron backend; set policy.dtensor_cfg.enabled=false and policy.megatron_cfg.enabled=true"
    ]


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
    return validate_master(
        GRPOMasterConfig,
        resolved,
        (
            lambda cfg: _rollout_global_batch_errors(cfg, cfg.grpo, "grpo", "GRPO"),
            lambda cfg: _rollout_logprob_batch_errors(cfg, cfg.grpo, "grpo"),
            *_generation_rules("grpo", "GRPO"),
            _greedy_group_errors,
            _batch_multiplier_errors,
            _reward_shaping_errors,
            _importance_weight_errors,
            _importance_mask_errors,
            _sequence_ratio_errors,
        ),
    )


def _batch_multiplier_errors(cfg: GRPOMasterConfig) -> list[str]:
    loop = cfg.grpo
    if loop.batch_multiplier == 1 or loop.use_dynamic_sampling:
        return []
    return [
        f"grpo.batch_multiplier: {loop.batch_multiplier} over-samples prompts for dynamic sampling only (without it "
        "the extra prompts would be generated for and never trained on); set grpo.use_dynamic_sampling=true or "
        "grpo.batch_multiplier=1"
    ]


def _reward_shaping_errors(cfg: GRPOMasterConfig) -> list[str]:
    """The overlong buffer lies within the maximum length, and responses can reach it."""
    shaping = cfg.grpo.reward_shaping
    if not shaping.enabled:
        return []
    buffer = shaping.overlong_buffer_length
    if buffer is None:
        return [
            "grpo.reward_shaping.overlong_buffer_length: required with grpo.reward_shaping.enabled=true (the last "
            "tokens before max_response_length over which the penalty grows; DAPO: 4096 of 20480)"
        ]
    max_new = _generation(cfg).max_new_tokens
    max_len, source = (
        (shaping.max_response_length, "grpo.reward_shaping.max_response_length")
        if shaping.max_response_length is not None
        else (max_new, "policy.generation.max_new_tokens (grpo.reward_shaping.max_response_length is null)")
    )
    if buffer > max_len:
        return [
            f"grpo.reward_shaping.overlong_buffer_length: {buffer} is longer than the maximum response length "
            f"{max_len} of {source}; set grpo.reward_shaping.overlong_buffer_length to at most {max_len}"
        ]
    if max_len - buffer >= max_new:
        return [
            f"grpo.reward_shaping: the penalty starts after max_response_length - overlong_buffer_length = "
            f"{max_len} - {buffer} = {max_len - buffer} tokens, but policy.generation.max_new_tokens = {max_new} "
            "stops every response before that, so nothing would be penalised; lower "
            "grpo.reward_shaping.max_response_length or raise overlong_buffer_length"
        ]
    return []


def _greedy_group_errors(cfg: GRPOMasterConfig) -> list[str]:
    generation = cfg.policy.generation
    if generation is None or generation.temperature != 0.0:
        return []
    return [
        "policy.generation.temperature: 0 makes every response of a group identical (advantage 0, nothing "
        "to learn); sample with a temperature > 0 (1.0 matches the policy's own distribution)"
    ]


def _rollout_global_batch_errors(
    cfg: MasterConfig, loop: GRPOConfig | DistillationConfig, section: str, algorithm: str
) -> list[str]:
    """A rollout (prompts x generations) splits into whole optimizer steps."""
    rollout, global_batch = (
        loop.num_prompts_per_step * loop.num_generations_per_prompt,
        cfg.policy.train_global_batch_size,
    )
    if rollout % global_batch == 0:
        return []
    return [
        f"{section}.num_prompts_per_step * {section}.num_generations_per_prompt = {rollout} must be a multiple of "
        f"policy.train_global_batch_size = {global_batch} (each {algorithm} step takes rollout / global batch "
        "optimizer steps)"
    ]


def _rollout_logprob_batch_errors(cfg: MasterConfig, loop: GRPOConfig | DistillationConfig, section: str) -> list[str]:
    """A rollout splits into whole log-prob micro-batches on every data-parallel rank."""
    rollout, dp = loop.num_prompts_per_step * loop.num_generations_per_prompt, _data_parallel_size(cfg)
    micro = cfg.policy.logprob_batch_size or cfg.policy.train_micro_batch_size
    if dp is None or rollout % (micro * dp) == 0:
        return []
    return [
        f"{section}.num_prompts_per_step * {section}.num_generations_per_prompt = {rollout} is not divisible by "
        f"policy.logprob_batch_size (or train_micro_batch_size) * data-parallel size = {micro} * {dp}"
    ]


def _generation_rules(section: str, algorithm: str) -> tuple[Callable[[MasterConfig], list[str]], ...]:
    """The rollout engine's rules (``policy.generation``), for any algorithm that samples with vLLM."""

    def required_errors(cfg: MasterConfig) -> list[str]:
        if cfg.policy.generation is not None:
            return []
        return [f"policy.generation: required by {algorithm} (the vLLM rollout engine: backend, max_new_tokens, ...)"]

    def run_owned_kwargs_errors(cfg: MasterConfig) -> list[str]:
        kwargs = _generation(cfg).vllm_kwargs
        return [
            f"policy.generation.vllm_kwargs.{key}: set by the run from {source.format(section=section)}; remove it here"
            for key, source in _RUN_OWNED_VLLM_KWARGS.items()
            if key in kwargs
        ]

    return (
        required_errors,
        _prompt_room_errors,
        _colocated_resources_errors,
        run_owned_kwargs_errors,
        _generation_tensor_parallel_errors,
    )


def _generation(cfg: MasterConfig) -> GenerationConfig:
    """``policy.generation`` for a rule of the engine; its absence is the required-section rule's to report."""
    if cfg.policy.generation is None:
        raise UnsetField("PolicyConfig.generation")
    return cfg.policy.generation


def _prompt_room_errors(cfg: MasterConfig) -> list[str]:
    max_new, max_len = _generation(cfg).max_new_tokens, cfg.policy.max_total_sequence_length
    if max_new < max_len:
        return []
    return [
        f"policy.generation.max_new_tokens: {max_new} leaves no room for a prompt within "
        f"policy.max_total_sequence_length = {max_len}; lower it or raise the sequence length"
    ]


def _colocated_resources_errors(cfg: MasterConfig) -> list[str]:
    colocated = _generation(cfg).colocated
    resources = (colocated.resources.gpus_per_node, colocated.resources.num_nodes)
    if colocated.enabled and any(r is not None for r in resources):
        return [
            "policy.generation.colocated.resources: colocated generation uses the policy's bundles; set "
            "gpus_per_node and num_nodes to null, or colocated.enabled=false for engines of their own"
        ]
    if not colocated.enabled and any(r is None for r in resources):
        return [
            "policy.generation.colocated.resources: generation on bundles of its own needs gpus_per_node and "
            "num_nodes (one vLLM engine per GPU; on a CPU machine one engine per CPU share)"
        ]
    return []


def _generation_tensor_parallel_errors(cfg: MasterConfig) -> list[str]:
    """An engine's TP ranks sit inside one node, so its size must divide the engines' devices per node."""
    generation = _generation(cfg)
    key, tp = (
        "policy.generation.vllm_kwargs.tensor_parallel_size",
        generation.vllm_kwargs.get("tensor_parallel_size", 1),
    )
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        return [f"{key}: {tp!r}; it must be a positive integer (1: one engine per GPU bundle)"]
    if generation.colocated.enabled:
        per_node_key, per_node = "cluster.gpus_per_node", cfg.cluster.gpus_per_node
    else:
        per_node_key, per_node = (
            "policy.generation.colocated.resources.gpus_per_node",
            generation.colocated.resources.gpus_per_node,
        )
    if per_node is None or per_node % tp == 0:
        return []
    return [
        f"{key}: {tp!r}; generation engines are data parallel over groups of {tp} devices inside a node, and "
        f"{per_node_key} = {per_node} is not a multiple of it; set it to 1 or a divisor of {per_node}"
    ]


# ----------------------------------------------------------------------------
# Validation shared by every algorithm
# ----------------------------------------------------------------------------
M = TypeVar("M", bound=MasterConfig)
C = TypeVar("C")
Rule = Callable[[C], list[str]]  # the errors a rule finds in a config (or one of its sections)


def validate_master(model: type[M], resolved: Mapping[str, Any], algorithm_rules: Sequence[Rule[M]] = ()) -> M:
    """Field validation plus the shared cross-field rules plus the algorithm's, raised as one error."""
    cfg, errors = _typed(model, resolved)
    long_context_errors, notes = _or_none(lambda: _long_context_rules(cfg)) or ([], [])
    errors += _apply(_POLICY_RULES, cfg) + long_context_errors + _apply(algorithm_rules, cfg)
    return _reported(cfg, errors, notes)


B = TypeVar("B", bound=BaseModel)
T = TypeVar("T")


def _typed(model: type[B], resolved: Mapping[str, Any]) -> tuple[B, list[str]]:
    """The validated config and no errors, or its lenient build (for the rules) and the field errors."""
    try:
        return model.model_validate(resolved), []
    except ValidationError as err:
        return _lenient(model, resolved), _field_errors(err, model)


def _reported(cfg: B, errors: Sequence[str], notes: Sequence[str]) -> B:
    """Every error raised together as one ConfigError; notes logged either way."""
    for note in notes:
        logger.warning(note)
    if errors:
        raise ConfigError(list(errors))
    return cfg


def _apply(rules: Sequence[Rule[C]], cfg: C) -> list[str]:
    errors = []
    for rule in rules:
        errors += _or_none(partial(rule, cfg)) or []
    return errors


def _or_none(read: Callable[[], T]) -> T | None:
    """``read()``, or None where it reads a field left unset: that field's own error already covers it."""
    try:
        return read()
    except UnsetField:
        return None


# ----------------------------------------------------------------------------
# The lenient build: what the rules read when some field is invalid
# ----------------------------------------------------------------------------
_INVALID = object()


def _lenient(model: type[B], raw: Mapping[str, Any]) -> B:
    """`model` from the fields of `raw` that validate on their own (nested sections field by field).

    The others stay unset, so reading one raises `UnsetField`, which skips the
    rule reading it, not the rules that read only valid fields. An invalid
    field with a default stays unset too: the rule must not see the default
    as if the user had written it.
    """
    values = {name: _lenient_field(model, name, raw[name]) for name in model.model_fields if name in raw}
    valid = {name: value for name, value in values.items() if value is not _INVALID}
    section = model.model_construct(**valid)
    for name in values.keys() - valid.keys():
        vars(section).pop(name, None)
    return section


def _lenient_field(model: type[BaseModel], name: str, value: Any) -> Any:
    nested = _section_model(model.model_fields[name].annotation)
    if nested is not None and isinstance(value, Mapping):
        try:
            return nested.model_validate(value)
        except ValidationError:
            return _lenient(nested, value)
    try:
        return _field_adapter(model, name).validate_python(value)
    except ValidationError:
        return _INVALID


@cache
def _field_adapter(model: type[BaseModel], name: str) -> TypeAdapter[Any]:
    """The field's own validation (type and constraints, strict as the sections are), apart from its model."""
    field = model.model_fields[name]
    annotated: Any = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
    return TypeAdapter(annotated, config=ConfigDict(strict=True))


# ----------------------------------------------------------------------------
# Rules of the policy, shared by every algorithm
# ----------------------------------------------------------------------------
def _dims(cfg: MasterConfig) -> ParallelDims:
    return ParallelDims.from_config(cfg.policy, cfg.cluster)


def _data_parallel_size(cfg: MasterConfig) -> int | None:
    """The run's data-parallel size, or None when the layout is malformed or does not divide the world."""
    dims = _or_none(lambda: _dims(cfg))
    return None if dims is None or dims.world_size_errors() else dims.dp


def _train_batch_errors(cfg: MasterConfig) -> list[str]:
    policy = cfg.policy
    return batch_errors(
        ("policy.train_global_batch_size", policy.train_global_batch_size),
        ("policy.train_micro_batch_size", policy.train_micro_batch_size),
        _data_parallel_size(cfg),
    )


def _dynamic_batching_pipeline_errors(cfg: MasterConfig) -> list[str]:
    """Pipeline stages exchange activations of one shape per schedule; token-budget micro-batches differ in shape."""
    pp = _dims(cfg).pp
    if not cfg.policy.dynamic_batching.enabled or pp == 1:
        return []
    return [
        f"policy.dynamic_batching.enabled: true with policy.megatron_cfg.pipeline_model_parallel_size = {pp}; "
        "pipeline stages send each other activations of one fixed shape per schedule, and token-budget "
        "micro-batches differ in shape; set policy.dynamic_batching.enabled=false or pipeline_model_parallel_size=1"
    ]


def _dynamic_batching_packing_errors(cfg: MasterConfig) -> list[str]:
    if not (cfg.policy.dynamic_batching.enabled and cfg.policy.sequence_packing.enabled):
        return []
    return [
        "policy.dynamic_batching.enabled: true with policy.sequence_packing.enabled = true; packing already fills "
        "each micro-batch to a token budget (one row of max_total_sequence_length); enable only one of the two"
    ]


def _dynamic_batching_backend_errors(cfg: MasterConfig) -> list[str]:
    """FSDP's collectives run in every micro-batch, so its ranks must run as many; token-budget shards may not."""
    if not (cfg.policy.dynamic_batching.enabled and cfg.policy.dtensor_cfg.enabled):
        return []
    return [
        "policy.dynamic_batching.enabled: true needs the Megatron backend (on the DTensor backend every rank must "
        "run the same number of micro-batches, and token-budget shards may need different numbers); set "
        "policy.dynamic_batching.enabled=false or use policy.megatron_cfg.enabled=true"
    ]


def _dynamic_batching_budget_errors(cfg: MasterConfig) -> list[str]:
    """Each budget holds the longest row a batch can have; with preference pairs, which stay together, two."""
    section, max_len = cfg.policy.dynamic_batching, cfg.policy.max_total_sequence_length
    if not section.enabled:
        return []
    need = cfg.rows_per_sample * max_len
    unit = "a row" if cfg.rows_per_sample == 1 else f"{cfg.rows_per_sample} rows of a sample, kept together,"
    budgets = {"train_mb_tokens": section.train_mb_tokens, "logprob_mb_tokens": section.logprob_mb_tokens}
    return [
        f"policy.dynamic_batching.{key}: {budget} is below {need}, what {unit} of "
        f"policy.max_total_sequence_length = {max_len} tokens needs; raise it to at least {need}"
        for key, budget in budgets.items()
        if budget < need
    ]


def _sequence_length_errors(cfg: MasterConfig) -> list[str]:
    max_len, divisible_by = cfg.policy.max_total_sequence_length, cfg.policy.make_sequence_length_divisible_by
    if max_len % divisible_by == 0:
        return []
    return [
        f"policy.max_total_sequence_length: {max_len} is not divisible by "
        f"policy.make_sequence_length_divisible_by = {divisible_by}"
    ]


def _lr_schedule_errors(cfg: MasterConfig) -> list[str]:
    """The schedule warms up from ``lr_warmup_init`` to ``lr`` and decays to ``min_lr``; megatron-core asserts
    both bounds in each worker, after Ray and the engines have started, so they are checked here."""
    optimizer, scheduler = cfg.policy.megatron_cfg.optimizer, cfg.policy.megatron_cfg.scheduler
    errors = []
    if optimizer.min_lr > optimizer.lr:
        errors.append(
            f"policy.megatron_cfg.optimizer.min_lr: {optimizer.min_lr} is above lr = {optimizer.lr}; the schedule "
            "would raise the LR"
        )
    if scheduler.lr_warmup_init > optimizer.lr:
        errors.append(
            f"policy.megatron_cfg.scheduler.lr_warmup_init: {scheduler.lr_warmup_init} is above "
            f"policy.megatron_cfg.optimizer.lr = {optimizer.lr}; the warm-up starts there and rises to lr, so set it "
            f"at most lr (e.g. lr_warmup_init: {optimizer.lr / 10:g}, or 0 without warm-up)"
        )
    return errors


def _backend_errors(cfg: MasterConfig) -> list[str]:
    """Exactly one training backend, and only the features it has."""
    policy = cfg.policy
    megatron, dtensor = policy.megatron_cfg.enabled, policy.dtensor_cfg.enabled
    if requests_yarn(policy.hf_config_overrides) and dtensor:
        return []  # the long-context rules name both keys
    if megatron == dtensor:
        state = "both true" if megatron else "both false"
        return [
            f"policy.megatron_cfg.enabled / policy.dtensor_cfg.enabled: {state}; enable exactly one training "
            "backend (Megatron for YaRN, tensor/pipeline/context parallelism and packing; DTensor for the HF model)"
        ]
    if megatron:
        return []
    return _apply(_DTENSOR_RULES, policy)


def _megatron_only(key: str, read: Callable[[PolicyConfig], int | bool], default: int | bool) -> Rule[PolicyConfig]:
    """A Megatron-only feature set away from its `default` under the DTensor backend (data parallel over
    whole sequences)."""

    def errors(policy: PolicyConfig) -> list[str]:
        value = read(policy)
        if value == default:
            return []
        fix = str(default).lower()
        return [
            f"{key}: {value!r} needs the Megatron backend (the DTensor backend is data parallel only); set it to "
            f"{fix} or use policy.megatron_cfg.enabled=true"
        ]

    return errors


def _dtensor_optimizer_errors(policy: PolicyConfig) -> list[str]:
    if policy.optimizer is not None:
        return []
    return ["policy.optimizer: required by the DTensor backend (e.g. name: torch.optim.AdamW, kwargs: {lr: 1e-5})"]


_DTENSOR_RULES: tuple[Rule[PolicyConfig], ...] = (
    _megatron_only(
        "policy.megatron_cfg.tensor_model_parallel_size", lambda p: p.megatron_cfg.tensor_model_parallel_size, 1
    ),
    _megatron_only(
        "policy.megatron_cfg.pipeline_model_parallel_size", lambda p: p.megatron_cfg.pipeline_model_parallel_size, 1
    ),
    _megatron_only("policy.megatron_cfg.context_parallel_size", lambda p: p.megatron_cfg.context_parallel_size, 1),
    _megatron_only("policy.megatron_cfg.sequence_parallel", lambda p: p.megatron_cfg.sequence_parallel, False),
    _megatron_only("policy.sequence_packing.enabled", lambda p: p.sequence_packing.enabled, False),
    _dtensor_optimizer_errors,
)

_POLICY_RULES: tuple[Rule[MasterConfig], ...] = (
    _train_batch_errors,
    _sequence_length_errors,
    lambda cfg: _dims(cfg).world_size_errors(),
    lambda cfg: _dims(cfg).sequence_parallel_errors(),
    lambda cfg: _dims(cfg).packing_errors(cfg.policy.sequence_packing.enabled),
    lambda cfg: _dims(cfg).sequence_length_errors(cfg.policy.make_sequence_length_divisible_by),
    _backend_errors,
    _lr_schedule_errors,
    _dynamic_batching_pipeline_errors,
    _dynamic_batching_packing_errors,
    _dynamic_batching_backend_errors,
    _dynamic_batching_budget_errors,
)


def _long_context_rules(cfg: MasterConfig) -> tuple[list[str], list[str]]:
    policy = cfg.policy
    if policy.hf_config_overrides is None:
        return [], []
    megatron, dtensor = policy.megatron_cfg.enabled, policy.dtensor_cfg.enabled
    _, errors, notes = validate_long_context(
        policy.hf_config_overrides, policy.max_total_sequence_length, megatron, dtensor
    )
    if megatron and not dtensor:
        errors += megatron_rope_type_errors(policy.hf_config_overrides)
    return errors, notes


def batch_errors(global_batch: tuple[str, int], micro_batch: tuple[str, int], dp: int | None) -> list[str]:
    """Megatron splits a global batch into data-parallel shards of whole micro-batches (each a (key, value))."""
    (global_key, global_size), (micro_key, micro) = global_batch, micro_batch
    if global_size % micro:
        return [f"{global_key}: {global_size} is not divisible by {micro_key} = {micro}"]
    if dp is None or global_size % (micro * dp) == 0:
        return []
    return [f"{global_key}: {global_size} is not divisible by {micro_key} * data-parallel size = {micro} * {dp}"]


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
