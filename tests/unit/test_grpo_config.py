"""The typed GRPO config: the shipped recipe validates, and each GRPO rule names the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from nemo_rl.config.loader import load_config, resolve_config
from nemo_rl.config.schema import (
    GenerationConfig,
    GRPOMasterConfig,
    SFTMasterConfig,
    validate_grpo_config,
    validate_sft_config,
)
from nemo_rl.utils.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"
GRPO_YAML = CONFIGS / "grpo_math.yaml"


def grpo(*overrides: str) -> GRPOMasterConfig:
    return validate_grpo_config(resolve_config(load_config(GRPO_YAML, list(overrides))))


def errors_of(*overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        grpo(*overrides)
    return info.value.messages


# ----------------------------------------------------------------------------
# the shipped recipe
# ----------------------------------------------------------------------------
def test_shipped_grpo_recipe_validates_with_typed_generation():
    cfg = grpo()
    assert isinstance(cfg, GRPOMasterConfig)
    assert cfg.grpo.num_prompts_per_step * cfg.grpo.num_generations_per_prompt == 16
    assert cfg.policy.train_global_batch_size == 16
    gen = cfg.policy.generation
    assert isinstance(gen, GenerationConfig)
    assert gen.backend == "vllm"
    assert gen.max_new_tokens == 16 and type(gen.max_new_tokens) is int
    assert gen.temperature == 1.0 and type(gen.temperature) is float
    assert gen.top_p == 1.0 and gen.stop_strings is None
    assert gen.colocated.enabled is True
    assert gen.colocated.resources.gpus_per_node is None and gen.colocated.resources.num_nodes is None
    assert gen.vllm_kwargs == {"gpu_memory_utilization": 0.6}
    assert cfg.policy.long_context is not None and cfg.policy.long_context.factor == 4.0
    assert cfg.policy.megatron_cfg.scheduler.lr_decay_iters == cfg.grpo.max_num_steps == 10


def test_separate_generation_resources_validate():
    gen = grpo(
        "policy.generation.colocated.enabled=false",
        "policy.generation.colocated.resources.gpus_per_node=2",
        "policy.generation.colocated.resources.num_nodes=1",
    ).policy.generation
    assert gen.colocated.enabled is False
    assert (gen.colocated.resources.gpus_per_node, gen.colocated.resources.num_nodes) == (2, 1)


def test_sft_config_still_validates_without_generation():
    raw = resolve_config(load_config(CONFIGS / "sft.yaml"))
    assert "generation" not in raw["policy"]
    cfg = validate_sft_config(raw)
    assert isinstance(cfg, SFTMasterConfig)
    assert cfg.policy.generation is None


# ----------------------------------------------------------------------------
# rollout batch rules
# ----------------------------------------------------------------------------
def test_rollout_must_be_a_multiple_of_the_train_global_batch():
    errors = errors_of("grpo.num_prompts_per_step=6")  # 6 * 4 = 24 rows, global batch 16
    assert errors == [
        "grpo.num_prompts_per_step * grpo.num_generations_per_prompt = 24 must be a multiple of "
        "policy.train_global_batch_size = 16 (each GRPO step takes rollout / global batch optimizer steps)"
    ]


def test_rollout_larger_than_the_global_batch_is_several_optimizer_steps():
    cfg = grpo("grpo.num_prompts_per_step=8")  # 32 rows: two optimizer steps of 16
    assert cfg.grpo.num_prompts_per_step == 8


def test_rollout_must_divide_into_logprob_batches_per_data_parallel_rank():
    assert grpo("policy.logprob_batch_size=16").policy.logprob_batch_size == 16  # dp = 1: 16 % 16 == 0
    errors = errors_of("cluster.gpus_per_node=2", "policy.logprob_batch_size=16")  # dp = 2: 16 % 32
    assert errors == [
        "grpo.num_prompts_per_step * grpo.num_generations_per_prompt = 16 is not divisible by "
        "policy.logprob_batch_size (or train_micro_batch_size) * data-parallel size = 16 * 2"
    ]


# ----------------------------------------------------------------------------
# generation rules
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("max_new_tokens", [1024, 4096])
def test_max_new_tokens_must_leave_room_for_a_prompt(max_new_tokens):
    assert errors_of(f"policy.generation.max_new_tokens={max_new_tokens}") == [
        f"policy.generation.max_new_tokens: {max_new_tokens} leaves no room for a prompt within "
        "policy.max_total_sequence_length = 1024; lower it or raise the sequence length"
    ]
    assert grpo("policy.generation.max_new_tokens=1023").policy.generation.max_new_tokens == 1023


@pytest.mark.parametrize("zero", ["0", "0.0"])
def test_temperature_zero_is_refused(zero):
    (error,) = errors_of(f"policy.generation.temperature={zero}")
    assert error.startswith("policy.generation.temperature: 0 makes every response of a group identical")
    assert "temperature > 0" in error


def test_colocated_generation_takes_no_resources():
    (error,) = errors_of("policy.generation.colocated.resources.gpus_per_node=1")
    assert error.startswith("policy.generation.colocated.resources: colocated generation uses the policy's bundles")
    assert "set gpus_per_node and num_nodes to null" in error and "colocated.enabled=false" in error


@pytest.mark.parametrize(
    "overrides",
    [
        ["policy.generation.colocated.enabled=false"],
        ["policy.generation.colocated.enabled=false", "policy.generation.colocated.resources.gpus_per_node=1"],
    ],
)
def test_separate_generation_needs_its_resources(overrides):
    (error,) = errors_of(*overrides)
    assert error.startswith(
        "policy.generation.colocated.resources: generation on bundles of its own needs gpus_per_node and num_nodes"
    )


@pytest.mark.parametrize(
    ("key", "value", "source"),
    [
        ("seed", "3", "grpo.seed"),
        ("model", "other", "policy.model_name"),
        ("dtype", "float16", "policy.precision"),
    ],
)
def test_run_owned_vllm_kwargs_are_refused(key, value, source):
    assert errors_of(f"+policy.generation.vllm_kwargs.{key}={value}") == [
        f"policy.generation.vllm_kwargs.{key}: set by the run from {source}; remove it here"
    ]


def test_generation_tensor_parallelism_is_refused():
    (error,) = errors_of("+policy.generation.vllm_kwargs.tensor_parallel_size=2")
    assert error.startswith("policy.generation.vllm_kwargs.tensor_parallel_size: 2; generation engines are data")
    assert "set it to 1" in error
    assert grpo("+policy.generation.vllm_kwargs.tensor_parallel_size=1").policy.generation.vllm_kwargs == {
        "gpu_memory_utilization": 0.6,
        "tensor_parallel_size": 1,
    }


def test_generation_tensor_parallelism_divides_the_engines_devices_per_node():
    tp2 = "+policy.generation.vllm_kwargs.tensor_parallel_size=2"
    assert grpo(tp2, "cluster.gpus_per_node=2").policy.generation.vllm_kwargs["tensor_parallel_size"] == 2
    own = (
        "policy.generation.colocated.enabled=false",
        "policy.generation.colocated.resources.gpus_per_node=4",
        "policy.generation.colocated.resources.num_nodes=1",
    )
    assert grpo(tp2, *own).policy.generation.colocated.resources.gpus_per_node == 4
    (error,) = errors_of("+policy.generation.vllm_kwargs.tensor_parallel_size=3", *own)
    assert error == (
        "policy.generation.vllm_kwargs.tensor_parallel_size: 3; generation engines are data parallel over groups of "
        "3 devices inside a node, and policy.generation.colocated.resources.gpus_per_node = 4 is not a multiple of "
        "it; set it to 1 or a divisor of 4"
    )
    assert errors_of("+policy.generation.vllm_kwargs.tensor_parallel_size=0") == [
        "policy.generation.vllm_kwargs.tensor_parallel_size: 0; it must be a positive integer (1: one engine per "
        "GPU bundle)"
    ]


def test_engines_are_placed_on_groups_of_tensor_parallel_bundles():
    from types import SimpleNamespace

    from nemo_rl.models.generation.vllm_generation import engine_placements

    # Colocated on 4 CPU "GPUs" per node, 2 nodes: an engine on every other policy bundle, two per node.
    policy_bundles = SimpleNamespace(workers_per_node=4, world_size=8, use_gpus=False)
    assert engine_placements(policy_bundles, 2, colocated=True) == [
        (0, (0, 2)),
        (2, (1, 2)),
        (4, (0, 2)),
        (6, (1, 2)),
    ]
    # Bundles of their own already hold an engine's devices: one engine per bundle.
    own_bundles = SimpleNamespace(workers_per_node=2, world_size=2, use_gpus=True)
    assert engine_placements(own_bundles, 2, colocated=False) == [(0, (0, 2)), (1, (1, 2))]
    with pytest.raises(ConfigError, match="colocated.enabled=true on GPUs"):
        engine_placements(SimpleNamespace(workers_per_node=4, world_size=4, use_gpus=True), 2, colocated=True)


def test_refit_buckets_default_to_256_mib_and_must_be_positive():
    assert grpo().policy.generation.refit_bucket_mib == 256
    assert grpo("+policy.generation.refit_bucket_mib=64").policy.generation.refit_bucket_mib == 64
    (error,) = errors_of("+policy.generation.refit_bucket_mib=0")
    assert error.startswith("policy.generation.refit_bucket_mib: Input should be greater than 0")


# ----------------------------------------------------------------------------
# fields and reporting
# ----------------------------------------------------------------------------
def test_a_group_of_one_is_a_field_error():
    errors = errors_of("grpo.num_generations_per_prompt=1")
    assert "grpo.num_generations_per_prompt: Input should be greater than or equal to 2 (got 1)" in errors


def test_missing_generation_section_is_required_by_grpo():
    assert errors_of("~policy.generation") == [
        "policy.generation: required by GRPO (the vLLM rollout engine: backend, max_new_tokens, ...)"
    ]


def test_generation_typo_is_a_field_error():
    errors = errors_of("~policy.generation.top_p", "+policy.generation.top_pp=0.9")
    assert "policy.generation.top_p: required key is missing" in errors
    assert any(error.startswith("policy.generation.top_pp: unknown key") for error in errors)


def test_generation_typo_suggests_the_key_it_meant():
    errors = errors_of("~policy.generation.top_p", "+policy.generation.top_pp=0.9")
    assert "policy.generation.top_pp: unknown key (did you mean policy.generation.top_p?)" in errors


def test_several_problems_are_reported_together():
    errors = errors_of(
        "grpo.num_prompts_per_step=6",
        "policy.generation.max_new_tokens=2048",
        "policy.generation.temperature=0.0",
        "+policy.generation.vllm_kwargs.seed=3",
        "policy.generation.colocated.enabled=false",
        "loss_fn.ratio_clip_min=1.5",
    )
    prefixes = [
        "grpo.num_prompts_per_step * grpo.num_generations_per_prompt = 24 must be a multiple of",
        "policy.generation.max_new_tokens: 2048 leaves no room",
        "policy.generation.temperature: 0 makes",
        "policy.generation.colocated.resources: generation on bundles of its own",
        "policy.generation.vllm_kwargs.seed: set by the run from grpo.seed",
        "loss_fn.ratio_clip_min: Input should be less than 1",
    ]
    for prefix in prefixes:
        assert sum(error.startswith(prefix) for error in errors) == 1, (prefix, errors)
    assert len(errors) == len(prefixes)


def test_missing_generation_does_not_hide_the_batch_rules():
    errors = errors_of("~policy.generation", "grpo.num_prompts_per_step=6")
    assert any(e.startswith("policy.generation: required by GRPO") for e in errors)
    assert any(e.startswith("grpo.num_prompts_per_step * grpo.num_generations_per_prompt = 24") for e in errors)
