"""The typed SFT config: the shipped recipe validates, and bad recipes fail with every problem at once."""

from __future__ import annotations

import copy
import logging
import pickle
from pathlib import Path

import pytest
from pydantic import ValidationError

from nemo_rl.config.loader import load_config, resolve_config
from nemo_rl.config.schema import PolicyConfig, SFTMasterConfig, validate_sft_config
from nemo_rl.rope.blocks import YarnScaling
from nemo_rl.utils.errors import ConfigError

SFT_YAML = Path(__file__).resolve().parents[2] / "examples" / "configs" / "sft.yaml"
_BASE = resolve_config(load_config(SFT_YAML))


@pytest.fixture
def raw() -> dict:
    return copy.deepcopy(_BASE)


def errors_of(resolved: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate_sft_config(resolved)
    return info.value.messages


def test_shipped_sft_recipe_validates(raw):
    cfg = validate_sft_config(raw)
    assert isinstance(cfg, SFTMasterConfig)
    assert cfg.sft.max_num_steps == 30
    assert cfg.policy.megatron_cfg.scheduler.lr_decay_iters == 30
    assert cfg.policy.tokenizer.name == "tiny-qwen2"
    assert cfg.logger.wandb.project == "nemo-rl"


def test_long_context_is_exposed_typed(raw):
    cfg = validate_sft_config(raw)
    assert cfg.policy.long_context == YarnScaling(10000.0, 4.0, 256, True, 32.0, 1.0, 1.0, 0.0)


def test_without_overrides_there_is_no_long_context(raw):
    raw["policy"]["hf_config_overrides"] = None
    assert validate_sft_config(raw).policy.long_context is None
    del raw["policy"]["hf_config_overrides"]
    assert validate_sft_config(raw).policy.long_context is None


def test_config_is_frozen_and_picklable(raw):
    cfg = validate_sft_config(raw)
    with pytest.raises(ValidationError):
        cfg.policy.precision = "bfloat16"
    restored = pickle.loads(pickle.dumps(cfg.policy))
    assert restored == cfg.policy and restored.long_context == cfg.policy.long_context


def test_policy_section_is_reusable_on_its_own(raw):
    policy = PolicyConfig.model_validate(raw["policy"])
    assert policy.long_context.factor == 4.0


def test_validation_creates_nothing(raw, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    validate_sft_config(raw)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------
# typos and types
# ----------------------------------------------------------------------------
def test_nested_typo_is_rejected_with_suggestion(raw):
    raw["policy"]["megatron_cfg"]["optimizer"]["lrr"] = raw["policy"]["megatron_cfg"]["optimizer"].pop("lr")
    errors = errors_of(raw)
    assert "policy.megatron_cfg.optimizer.lrr: unknown key (did you mean policy.megatron_cfg.optimizer.lr?)" in errors
    assert "policy.megatron_cfg.optimizer.lr: required key is missing" in errors


def test_top_level_typo_is_rejected_with_suggestion(raw):
    raw["checkpointng"] = raw.pop("checkpointing")
    assert "checkpointng: unknown key (did you mean checkpointing?)" in errors_of(raw)


def test_wrong_types_are_not_coerced(raw):
    raw["policy"]["train_global_batch_size"] = "8"
    raw["policy"]["train_micro_batch_size"] = 4.0
    raw["sft"]["val_at_start"] = 0
    errors = errors_of(raw)
    assert "policy.train_global_batch_size: Input should be a valid integer (got '8')" in errors
    assert "policy.train_micro_batch_size: Input should be a valid integer (got 4.0)" in errors
    assert "sft.val_at_start: Input should be a valid boolean (got 0)" in errors


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("sft", "max_num_steps", 0, "sft.max_num_steps: Input should be greater than 0"),
        ("sft", "max_num_epochs", -1, "sft.max_num_epochs: Input should be greater than 0"),
        ("checkpointing", "save_period", 0, "checkpointing.save_period: Input should be greater than 0"),
        ("policy", "precision", "fp8", "policy.precision: Input should be 'float32', 'bfloat16' or 'float16'"),
        (
            "policy",
            "make_sequence_length_divisible_by",
            0,
            "policy.make_sequence_length_divisible_by: Input should be greater than 0",
        ),
    ],
)
def test_field_rules(raw, section, key, value, expected):
    raw[section][key] = value
    assert any(error.startswith(expected) for error in errors_of(raw))


def test_lr_decay_style_is_checked(raw):
    raw["policy"]["megatron_cfg"]["scheduler"]["lr_decay_style"] = "exponential"
    assert errors_of(raw) == [
        "policy.megatron_cfg.scheduler.lr_decay_style: Input should be 'constant', 'linear' or 'cosine' "
        "(got 'exponential')"
    ]


# ----------------------------------------------------------------------------
# cross-field rules
# ----------------------------------------------------------------------------
def test_train_batch_must_divide_into_micro_batches(raw):
    raw["policy"]["train_micro_batch_size"] = 3
    assert errors_of(raw) == ["policy.train_global_batch_size: 8 is not divisible by policy.train_micro_batch_size = 3"]


def test_val_batch_must_divide_into_micro_batches(raw):
    raw["sft"]["val_micro_batch_size"] = 3
    assert errors_of(raw) == ["sft.val_global_batch_size: 8 is not divisible by sft.val_micro_batch_size = 3"]


def test_batch_must_divide_across_data_parallel_ranks(raw):
    raw["cluster"]["gpus_per_node"] = 4  # dp = 4, micro 4 -> 16 rows per step needed
    errors = errors_of(raw)
    assert (
        "policy.train_global_batch_size: 8 is not divisible by "
        "policy.train_micro_batch_size * data-parallel size = 4 * 4"
    ) in errors
    assert len(errors) == 2  # the validation batch has the same problem


def test_model_parallel_must_divide_the_world(raw):
    raw["cluster"]["gpus_per_node"] = 3
    raw["policy"]["megatron_cfg"]["tensor_model_parallel_size"] = 2
    errors = errors_of(raw)
    assert errors[0].startswith("cluster: gpus_per_node * num_nodes = 3 is not divisible by tensor * pipeline")


@pytest.mark.parametrize(
    ("tp", "pp", "sp", "gpus"),
    [(2, 1, False, 2), (2, 1, True, 2), (1, 2, False, 2), (2, 2, True, 4), (2, 1, False, 4)],
)
def test_tensor_and_pipeline_layouts_are_accepted(raw, tp, pp, sp, gpus):
    raw["cluster"]["gpus_per_node"] = gpus
    raw["policy"]["megatron_cfg"].update(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=sp
    )
    raw["policy"]["train_micro_batch_size"] = raw["sft"]["val_micro_batch_size"] = 1
    raw["policy"]["make_sequence_length_divisible_by"] = 8
    cfg = validate_sft_config(raw)
    assert cfg.policy.megatron_cfg.tensor_model_parallel_size == tp
    assert cfg.policy.megatron_cfg.pipeline_model_parallel_size == pp


def test_sequence_parallel_needs_tensor_parallelism(raw):
    raw["policy"]["megatron_cfg"]["sequence_parallel"] = True
    (error,) = errors_of(raw)
    assert error.startswith("policy.megatron_cfg.sequence_parallel: true needs policy.megatron_cfg.tensor_model")


def test_divisible_by_must_fit_sequence_parallel_and_names_the_smallest_value(raw):
    raw["cluster"]["gpus_per_node"] = 4
    raw["policy"]["megatron_cfg"].update(tensor_model_parallel_size=4, sequence_parallel=True)
    raw["policy"]["make_sequence_length_divisible_by"] = 2
    assert errors_of(raw) == [
        "policy.make_sequence_length_divisible_by: 2 must be a multiple of 4 "
        "(tensor_model_parallel_size (4) with sequence_parallel); the smallest valid value is 4, "
        "the nearest above yours 4"
    ]


def test_sequence_length_must_be_divisible(raw):
    raw["policy"]["make_sequence_length_divisible_by"] = 48
    assert errors_of(raw) == [
        "policy.max_total_sequence_length: 1024 is not divisible by policy.make_sequence_length_divisible_by = 48"
    ]


def test_min_lr_above_lr_is_refused(raw):
    raw["policy"]["megatron_cfg"]["optimizer"]["min_lr"] = 1.0
    assert errors_of(raw)[0].startswith("policy.megatron_cfg.optimizer.min_lr: 1.0 is above lr")


def test_a_warm_up_starting_above_lr_is_refused_before_megatron_asserts_it(raw):
    raw["policy"]["megatron_cfg"]["scheduler"]["lr_warmup_init"] = 1.0
    (error,) = errors_of(raw)
    assert error.startswith(
        "policy.megatron_cfg.scheduler.lr_warmup_init: 1.0 is above policy.megatron_cfg.optimizer.lr"
    )
    assert "set it at most lr" in error


# ----------------------------------------------------------------------------
# YaRN through the schema, and one report for everything
# ----------------------------------------------------------------------------
def test_yarn_rules_are_part_of_validation(raw):
    raw["policy"]["dtensor_cfg"]["enabled"] = True
    raw["policy"]["megatron_cfg"]["enabled"] = False
    errors = errors_of(raw)
    assert len(errors) == 1
    assert "set policy.megatron_cfg.enabled=true and policy.dtensor_cfg.enabled=false" in errors[0]


def test_factor_computed_from_an_override_still_covers():
    resolved = resolve_config(load_config(SFT_YAML, ["policy.max_total_sequence_length=4096"]))
    assert validate_sft_config(resolved).policy.long_context.factor == 16.0


def test_fixed_factor_that_no_longer_covers_is_an_error():
    resolved = resolve_config(
        load_config(
            SFT_YAML, ["policy.hf_config_overrides.rope_scaling.factor=2.0", "policy.max_total_sequence_length=1024"]
        )
    )
    [error] = errors_of(resolved)
    assert error.startswith("policy.hf_config_overrides.rope_scaling.factor: factor * original_max_position_embeddings")


def test_no_extension_note_is_logged(raw, caplog):
    raw["policy"]["max_total_sequence_length"] = 256
    raw["policy"]["hf_config_overrides"]["rope_scaling"]["factor"] = 2.0
    with caplog.at_level(logging.INFO, logger="nemo_rl.config.schema"):
        cfg = validate_sft_config(raw)
    assert cfg.policy.long_context is None and cfg.policy.effective_hf_config_overrides is None
    assert any("YaRN is a no-op here" in record.getMessage() for record in caplog.records)


def test_multiple_errors_from_every_source_are_reported_together(raw):
    raw["sft"]["max_num_stepz"] = raw["sft"].pop("max_num_steps")  # typo
    raw["policy"]["train_micro_batch_size"] = 3  # divisibility
    raw["policy"]["precision"] = "fp8"  # enum
    raw["policy"]["hf_config_overrides"]["rope_scaling"].pop("beta_slow")  # YaRN field
    raw["policy"]["dtensor_cfg"]["enabled"] = True  # YaRN backend
    errors = errors_of(raw)
    expected_starts = [
        "sft.max_num_stepz: unknown key (did you mean sft.max_num_steps?)",
        "sft.max_num_steps: required key is missing",
        "policy.train_global_batch_size: 8 is not divisible",
        "policy.precision: Input should be",
        "policy.hf_config_overrides.rope_scaling.rope_type: YaRN is only supported on the Megatron backend",
        "policy.hf_config_overrides.rope_scaling.beta_slow: required for rope_type=yarn",
    ]
    for start in expected_starts:
        assert any(error.startswith(start) for error in errors), (start, errors)
    assert len(errors) == len(expected_starts)


def test_context_parallel_needs_packing_and_sizes_names_the_smallest_multiple(raw):
    raw["cluster"]["gpus_per_node"] = 4
    raw["policy"]["megatron_cfg"].update(context_parallel_size=2, tensor_model_parallel_size=2, sequence_parallel=True)
    raw["policy"]["make_sequence_length_divisible_by"] = 4
    assert errors_of(raw) == [
        "policy.megatron_cfg.context_parallel_size: 2 needs sequence packing (each rank holds chunks of every "
        "packed sample, as in megatron-core); set policy.sequence_packing.enabled=true",
        "policy.make_sequence_length_divisible_by: 4 must be a multiple of 8 (2 x context_parallel_size (2) x "
        "tensor_model_parallel_size (2) with sequence_parallel); the smallest valid value is 8, the nearest above "
        "yours 8",
    ]
    raw["policy"]["sequence_packing"]["enabled"] = True
    raw["policy"]["make_sequence_length_divisible_by"] = 16
    raw["policy"]["train_micro_batch_size"] = raw["sft"]["val_micro_batch_size"] = 1
    assert validate_sft_config(raw).policy.megatron_cfg.context_parallel_size == 2


def test_exactly_one_backend(raw):
    raw["policy"]["hf_config_overrides"] = None
    raw["policy"]["dtensor_cfg"]["enabled"] = True
    assert errors_of(raw) == [
        "policy.megatron_cfg.enabled / policy.dtensor_cfg.enabled: both true; enable exactly one training backend "
        "(Megatron for YaRN, tensor/pipeline/context parallelism and packing; DTensor for the HF model)"
    ]


def test_dtensor_backend_validates_and_refuses_megatron_only_features(raw):
    raw["policy"]["hf_config_overrides"] = None
    raw["policy"]["dtensor_cfg"]["enabled"] = True
    raw["policy"]["megatron_cfg"]["enabled"] = False
    cfg = validate_sft_config(raw)
    assert cfg.policy.optimizer.name == "torch.optim.AdamW"
    raw["cluster"]["gpus_per_node"] = 2
    raw["policy"]["megatron_cfg"]["tensor_model_parallel_size"] = 2
    raw["policy"]["sequence_packing"]["enabled"] = True
    del raw["policy"]["optimizer"]
    assert errors_of(raw) == [
        "policy.megatron_cfg.tensor_model_parallel_size: 2 needs the Megatron backend (the DTensor backend is data "
        "parallel only); set it to 1 or use policy.megatron_cfg.enabled=true",
        "policy.sequence_packing.enabled: True needs the Megatron backend (the DTensor backend is data parallel "
        "only); set it to false or use policy.megatron_cfg.enabled=true",
        "policy.optimizer: required by the DTensor backend (e.g. name: torch.optim.AdamW, kwargs: {lr: 1e-5})",
    ]
