"""The DPO, reward-model and distillation recipes: shipped configs validate, each rule names its key.

Entry scripts refuse a bad recipe with exit status 2 and every problem on
stderr, before Ray starts or any directory is written.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from nemo_rl.config.loader import load_config, resolve_config
from nemo_rl.config.schema import (
    DistillationMasterConfig,
    DPOMasterConfig,
    RMMasterConfig,
    validate_distillation_config,
    validate_dpo_config,
    validate_grpo_config,
    validate_rm_config,
)
from nemo_rl.utils.errors import ConfigError
from tests.helpers import entry_main

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"
RECIPES = {
    "dpo": ("dpo.yaml", validate_dpo_config),
    "rm": ("rm.yaml", validate_rm_config),
    "distillation": ("distillation_math.yaml", validate_distillation_config),
    "grpo": ("grpo_math.yaml", validate_grpo_config),
}
TO_DTENSOR = ("policy.dtensor_cfg.enabled=true", "policy.megatron_cfg.enabled=false", "~policy.hf_config_overrides")


def validated(recipe: str, *overrides: str):
    yaml, validate = RECIPES[recipe]
    return validate(resolve_config(load_config(CONFIGS / yaml, list(overrides))))


def errors_of(recipe: str, *overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validated(recipe, *overrides)
    return info.value.messages


# ----------------------------------------------------------------------------
# the shipped recipes
# ----------------------------------------------------------------------------
def test_shipped_dpo_recipe_validates():
    cfg = validated("dpo")
    assert isinstance(cfg, DPOMasterConfig)
    assert cfg.dpo.reference_policy_kl_penalty == 0.1
    assert cfg.dpo.sft_loss_weight == 0.0 and cfg.dpo.preference_average_log_probs is False
    assert cfg.policy.sequence_packing.enabled is False and cfg.policy.megatron_cfg.enabled is True
    assert cfg.policy.megatron_cfg.scheduler.lr_decay_iters == cfg.dpo.max_num_steps
    assert cfg.data.dataset_name == "tiny-preference"
    assert cfg.policy.long_context is not None and cfg.policy.long_context.factor == 4.0


def test_shipped_rm_recipe_validates():
    cfg = validated("rm")
    assert isinstance(cfg, RMMasterConfig)
    assert cfg.policy.megatron_cfg.enabled is True and cfg.policy.dtensor_cfg.enabled is False
    assert cfg.policy.sequence_packing.enabled is False
    assert cfg.policy.megatron_cfg.scheduler.lr_decay_iters == cfg.rm.max_num_steps


def test_shipped_distillation_recipe_validates():
    cfg = validated("distillation")
    assert isinstance(cfg, DistillationMasterConfig)
    assert cfg.teacher.model_name == "tiny-qwen2-teacher"
    assert cfg.loss_fn.kl_type == "forward"
    assert cfg.distillation.topk_logits_k == 64
    assert cfg.policy.generation is not None and cfg.policy.generation.backend == "vllm"
    rollout = cfg.distillation.num_prompts_per_step * cfg.distillation.num_generations_per_prompt
    assert rollout % cfg.policy.train_global_batch_size == 0


def test_dpo_beta_must_be_positive():
    errors = errors_of("dpo", "dpo.reference_policy_kl_penalty=0.0")
    assert errors == ["dpo.reference_policy_kl_penalty: Input should be greater than 0 (got 0.0)"]


# ----------------------------------------------------------------------------
# pairwise layouts
# ----------------------------------------------------------------------------
@pytest.mark.parametrize(("recipe", "algorithm"), [("dpo", "DPO"), ("rm", "reward modeling")])
def test_pairwise_losses_refuse_sequence_packing(recipe, algorithm):
    (error,) = errors_of(recipe, "policy.sequence_packing.enabled=true")
    assert error.startswith(f"policy.sequence_packing.enabled: {algorithm} compares each chosen sequence")
    assert "set it to false" in error


@pytest.mark.parametrize("recipe", ["dpo", "rm"])
def test_pairwise_losses_with_context_parallelism_are_told_why_it_cannot_work(recipe):
    cp = ("policy.megatron_cfg.context_parallel_size=2", "cluster.gpus_per_node=2")
    (packing_error,) = errors_of(recipe, *cp, "policy.sequence_packing.enabled=true")
    assert packing_error.startswith("policy.sequence_packing.enabled:")
    assert "context parallelism needs packing" in packing_error
    assert "tensor/sequence parallelism" in packing_error
    (cp_error,) = errors_of(recipe, *cp)
    assert cp_error.startswith("policy.megatron_cfg.context_parallel_size: 2 needs sequence packing")


def test_rm_refuses_the_dtensor_backend():
    assert errors_of("rm", *TO_DTENSOR) == [
        "policy.dtensor_cfg.enabled: the reward model's scalar head is built on the Megatron backend; set "
        "policy.dtensor_cfg.enabled=false and policy.megatron_cfg.enabled=true"
    ]


def test_dpo_runs_on_the_dtensor_backend():
    cfg = validated("dpo", *TO_DTENSOR)
    assert cfg.policy.dtensor_cfg.enabled is True and cfg.policy.long_context is None


# ----------------------------------------------------------------------------
# typos in the new sections
# ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("recipe", "section", "key", "typo"),
    [
        ("dpo", "dpo", "reference_policy_kl_penalty", "reference_policy_kl_penaltyy"),
        ("dpo", "dpo", "sft_loss_weight", "sft_los_weight"),
        ("rm", "rm", "val_batches", "val_batchs"),
        ("distillation", "teacher", "model_name", "model_nam"),
        ("distillation", "loss_fn", "kl_type", "kl_typ"),
        ("distillation", "distillation", "topk_logits_k", "topk_logit_k"),
    ],
)
def test_a_typo_in_a_new_section_suggests_the_key_it_meant(recipe, section, key, typo):
    errors = errors_of(recipe, f"~{section}.{key}", f"+{section}.{typo}=1")
    assert sorted(errors) == sorted(
        [
            f"{section}.{key}: required key is missing",
            f"{section}.{typo}: unknown key (did you mean {section}.{key}?)",
        ]
    )


# ----------------------------------------------------------------------------
# distillation rules
# ----------------------------------------------------------------------------
def test_distillation_rollout_must_be_a_multiple_of_the_global_batch():
    errors = errors_of("distillation", "distillation.num_prompts_per_step=3")  # 3 * 2 = 6 rows, global batch 8
    assert (
        "distillation.num_prompts_per_step * distillation.num_generations_per_prompt = 6 must be a multiple of "
        "policy.train_global_batch_size = 8 (each distillation step takes rollout / global batch optimizer steps)"
    ) in errors
    assert all(e.startswith("distillation.num_prompts_per_step * ") for e in errors)


def test_distillation_rejects_an_unknown_kl_type():
    (error,) = errors_of("distillation", "loss_fn.kl_type=bad")
    assert error.startswith("loss_fn.kl_type: Input should be 'forward', 'reverse' or 'mixed'")
    assert "'bad'" in error


@pytest.mark.parametrize("kl_type", ["forward", "reverse", "mixed"])
def test_distillation_accepts_each_kl_type(kl_type):
    assert validated("distillation", f"loss_fn.kl_type={kl_type}").loss_fn.kl_type == kl_type


def test_mixed_kl_weight_is_a_fraction():
    (error,) = errors_of("distillation", "loss_fn.mixed_kl_weight=1.5")
    assert error.startswith("loss_fn.mixed_kl_weight: Input should be less than or equal to 1")


def test_distillation_needs_the_generation_section():
    assert errors_of("distillation", "~policy.generation") == [
        "policy.generation: required by distillation (the vLLM rollout engine: backend, max_new_tokens, ...)"
    ]


def test_distillation_owns_the_vllm_seed():
    assert errors_of("distillation", "+policy.generation.vllm_kwargs.seed=3") == [
        "policy.generation.vllm_kwargs.seed: set by the run from distillation.seed; remove it here"
    ]


def test_distillation_refuses_the_dtensor_backend():
    errors = errors_of("distillation", *TO_DTENSOR)
    assert any(e.startswith("policy.dtensor_cfg.enabled: distillation reads the teacher's top-k") for e in errors)


def test_temperature_zero_is_a_grpo_rule_only():
    grpo_errors = errors_of("grpo", "policy.generation.temperature=0.0")
    assert any(
        e.startswith("policy.generation.temperature: 0 makes every response of a group identical") for e in grpo_errors
    )
    cfg = validated("distillation", "policy.generation.temperature=0.0")
    assert cfg.policy.generation.temperature == 0.0


# ----------------------------------------------------------------------------
# entry scripts
# ----------------------------------------------------------------------------
def _ray_started() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


@pytest.mark.parametrize(
    ("script", "bad_key", "message", "log_dir"),
    [
        (
            "run_dpo",
            "+dpo.max_num_step=2",
            "dpo.max_num_step: unknown key (did you mean dpo.max_num_steps?)",
            "results/dpo/logs",
        ),
        ("run_rm", "+rm.seeds=2", "rm.seeds: unknown key (did you mean rm.seed?)", "results/rm/logs"),
        (
            "run_distillation_math",
            "+teacher.model_nam=x",
            "teacher.model_nam: unknown key (did you mean teacher.model_name?)",
            "results/distillation/logs",
        ),
    ],
)
def test_entry_scripts_refuse_a_bad_key_before_writing_anything(
    script, bad_key, message, log_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    code = entry_main(script)([bad_key])
    err = capsys.readouterr().err
    assert code == 2
    assert "Invalid configuration" in err
    assert message in err
    assert not (tmp_path / log_dir).exists()
    assert list(tmp_path.iterdir()) == []
    assert not _ray_started()


def test_entry_scripts_list_every_problem(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = entry_main("run_dpo")(["policy.sequence_packing.enabled=true", "dpo.reference_policy_kl_penalty=-1.0"])
    err = capsys.readouterr().err
    assert code == 2
    assert "policy.sequence_packing.enabled: DPO compares each chosen sequence" in err
    assert "dpo.reference_policy_kl_penalty: Input should be greater than 0" in err
    assert list(tmp_path.iterdir()) == []
