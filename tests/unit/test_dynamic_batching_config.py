"""``policy.dynamic_batching``: shipped disabled in every base config, and refused by name where it cannot work."""

from __future__ import annotations

from pathlib import Path

import pytest

from nemo_rl.config.loader import load_config, resolve_config
from nemo_rl.config.schema import (
    validate_distillation_config,
    validate_dpo_config,
    validate_grpo_config,
    validate_rm_config,
    validate_sft_config,
)
from nemo_rl.utils.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"
BASES = {
    "sft.yaml": validate_sft_config,
    "grpo_math.yaml": validate_grpo_config,
    "dpo.yaml": validate_dpo_config,
    "rm.yaml": validate_rm_config,
    "distillation_math.yaml": validate_distillation_config,
}
ON = "policy.dynamic_batching.enabled=true"


def validated(yaml: str, *overrides: str):
    return BASES[yaml](resolve_config(load_config(CONFIGS / yaml, list(overrides))))


def errors_of(yaml: str, *overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validated(yaml, *overrides)
    return info.value.messages


@pytest.mark.parametrize("yaml", list(BASES))
def test_every_base_config_ships_it_disabled_with_budgets_that_validate_when_enabled(yaml):
    assert validated(yaml).policy.dynamic_batching.enabled is False
    section = validated(yaml, ON).policy.dynamic_batching
    assert section.enabled and section.sequence_length_round == 64


def test_the_budgets_follow_the_fixed_micro_batches_in_tokens():
    grpo = validated("grpo_math.yaml").policy  # 4 and 8 rows of 1024 tokens
    assert (grpo.dynamic_batching.train_mb_tokens, grpo.dynamic_batching.logprob_mb_tokens) == (4096, 8192)
    dpo = validated("dpo.yaml", "policy.train_micro_batch_size=1").policy  # one pair: two rows
    assert (dpo.dynamic_batching.train_mb_tokens, dpo.dynamic_batching.logprob_mb_tokens) == (2048, 2048)


def test_pipeline_parallelism_is_refused():
    pp2 = ("cluster.gpus_per_node=2", "policy.megatron_cfg.pipeline_model_parallel_size=2")
    assert validated("sft.yaml", *pp2).policy.megatron_cfg.pipeline_model_parallel_size == 2  # fine without it
    assert errors_of("sft.yaml", ON, *pp2) == [
        "policy.dynamic_batching.enabled: true with policy.megatron_cfg.pipeline_model_parallel_size = 2; pipeline "
        "stages send each other activations of one fixed shape per schedule, and token-budget micro-batches differ "
        "in shape; set policy.dynamic_batching.enabled=false or pipeline_model_parallel_size=1"
    ]


def test_sequence_packing_is_refused():
    assert errors_of("sft.yaml", ON, "policy.sequence_packing.enabled=true") == [
        "policy.dynamic_batching.enabled: true with policy.sequence_packing.enabled = true; packing already fills "
        "each micro-batch to a token budget (one row of max_total_sequence_length); enable only one of the two"
    ]


def test_the_dtensor_backend_is_refused():
    to_dtensor = ("policy.dtensor_cfg.enabled=true", "policy.megatron_cfg.enabled=false", "~policy.hf_config_overrides")
    (error,) = errors_of("sft.yaml", ON, *to_dtensor)
    assert error.startswith("policy.dynamic_batching.enabled: true needs the Megatron backend")
    assert error.endswith("set policy.dynamic_batching.enabled=false or use policy.megatron_cfg.enabled=true")


def test_a_budget_below_the_longest_row_is_refused_by_key():
    assert errors_of("grpo_math.yaml", ON, "policy.dynamic_batching.train_mb_tokens=1000") == [
        "policy.dynamic_batching.train_mb_tokens: 1000 is below 1024, what a row of "
        "policy.max_total_sequence_length = 1024 tokens needs; raise it to at least 1024"
    ]
    assert validated("grpo_math.yaml", ON, "policy.dynamic_batching.logprob_mb_tokens=1024")  # one row fits exactly


@pytest.mark.parametrize("yaml", ["dpo.yaml", "rm.yaml"])
def test_preference_budgets_hold_a_whole_pair(yaml):
    assert errors_of(yaml, ON, "policy.dynamic_batching.logprob_mb_tokens=1024") == [
        "policy.dynamic_batching.logprob_mb_tokens: 1024 is below 2048, what 2 rows of a sample, kept together, of "
        "policy.max_total_sequence_length = 1024 tokens needs; raise it to at least 2048"
    ]


def test_nothing_is_checked_while_disabled():
    small = ("policy.dynamic_batching.train_mb_tokens=8", "policy.sequence_packing.enabled=true")
    assert validated("sft.yaml", *small).policy.dynamic_batching.train_mb_tokens == 8
