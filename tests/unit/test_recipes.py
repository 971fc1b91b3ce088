"""Every recipe in the tree loads, resolves and validates with its algorithm's validator."""

from __future__ import annotations

from pathlib import Path

import pytest

from nemo_rl.config.loader import load_config, redundant_keys, resolve_config
from nemo_rl.config.schema import (
    validate_distillation_config,
    validate_dpo_config,
    validate_grpo_config,
    validate_rm_config,
    validate_sft_config,
)

RECIPES = sorted((Path(__file__).resolve().parents[2] / "examples" / "configs" / "recipes" / "llm").glob("*.yaml"))

# A recipe's file name starts with its algorithm: `sft-...yaml`, `grpo-...yaml`, ...
VALIDATORS = {
    "sft-": validate_sft_config,
    "grpo-": validate_grpo_config,
    "dpo-": validate_dpo_config,
    "rm-": validate_rm_config,
    "distillation-": validate_distillation_config,
}


def validator_for(recipe: Path):
    matches = [validate for prefix, validate in VALIDATORS.items() if recipe.name.startswith(prefix)]
    if not matches:
        pytest.fail(
            f"{recipe.name}: no validator for its prefix (known: {', '.join(VALIDATORS)}); "
            "add the algorithm's validator to VALIDATORS in tests/unit/test_recipes.py"
        )
    return matches[0]


def test_there_are_recipes():
    assert RECIPES


@pytest.mark.parametrize(
    ("name", "validator"),
    [("sft-tiny.yaml", validate_sft_config), ("grpo-tiny-math.yaml", validate_grpo_config)],
)
def test_validator_is_chosen_by_prefix(name, validator):
    assert validator_for(Path(name)) is validator


def test_unknown_prefix_asks_for_its_validator():
    with pytest.raises(pytest.fail.Exception, match="add the algorithm's validator"):
        validator_for(Path("ppo-tiny.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(recipe):
    cfg = validator_for(recipe)(resolve_config(load_config(recipe)))
    if recipe.name.startswith(("grpo-", "distillation-")):
        assert cfg.policy.generation is not None
    if "yarn" in recipe.name:
        yarn = cfg.policy.long_context
        assert yarn is not None
        assert yarn.factor * yarn.original_max_position_embeddings >= cfg.policy.max_total_sequence_length


RECIPE_DIR = Path(__file__).resolve().parents[2] / "examples" / "configs" / "recipes" / "llm"


@pytest.mark.parametrize(
    ("name", "validate", "length", "factor", "cp", "divisible_by", "world"),
    [
        ("sft-qwen3-0.6B-1n8g-megatron-yarn-64k.yaml", validate_sft_config, 65536, 1.6, 8, 16, 8),
        ("grpo-qwen2.5-1.5B-4n8g-megatron-yarn-256k.yaml", validate_grpo_config, 262144, 8.0, 32, 64, 32),
    ],
)
def test_seed_recipes_match_the_yarn_guide(name, validate, length, factor, cp, divisible_by, world):
    """The two recipes the YaRN guide names: length, the `div`-derived factor, CP, divisibility, cluster."""
    cfg = validate(resolve_config(load_config(RECIPE_DIR / name)))
    yarn = cfg.policy.long_context
    assert cfg.policy.max_total_sequence_length == length
    assert yarn.factor == pytest.approx(factor)
    assert yarn.factor * yarn.original_max_position_embeddings == pytest.approx(length)
    assert cfg.policy.megatron_cfg.context_parallel_size == cp
    assert cfg.policy.make_sequence_length_divisible_by == divisible_by
    assert cfg.cluster.gpus_per_node * cfg.cluster.num_nodes == world
    assert cfg.policy.megatron_cfg.enabled and not cfg.policy.dtensor_cfg.enabled
    assert cfg.policy.precision == "bfloat16"
    # the factor is derived with `div`, not written down: it follows the sequence length
    doubled = resolve_config(load_config(RECIPE_DIR / name, [f"policy.max_total_sequence_length={2 * length}"]))
    assert doubled["policy"]["hf_config_overrides"]["rope_scaling"]["factor"] == pytest.approx(2 * factor)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_states_only_what_differs_from_its_defaults(recipe):
    assert redundant_keys(recipe) == [], "run: uv run tools/expand_recipe.py --check-minimal " + recipe.name


def test_redundant_keys_finds_repeats_of_the_defaults_chain(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("a: {b: 1, c: [1, 2], f: '${a.b}'}\nd: x\n")
    (tmp_path / "mid.yaml").write_text("defaults: base.yaml\nd: y\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("defaults: mid.yaml\na: {b: 2, c: [1, 2], f: '${a.b}'}\nd: y\ne: 3\n")
    # a.b and e differ from or add to the chain; the list, the interpolation and mid's d are repeats
    assert redundant_keys(recipe) == ["a.c", "a.f", "d"]


def test_expand_recipe_prints_the_resolved_config_and_checks_minimality(tmp_path, capsys):
    from tests.helpers import load_tool

    expand = load_tool("expand_recipe")
    recipe = RECIPE_DIR / "grpo-qwen2.5-1.5B-4n8g-megatron-yarn-256k.yaml"
    assert expand([str(recipe)]) == 0
    printed = capsys.readouterr().out
    assert "factor: 8.0" in printed and "context_parallel_size: 32" in printed
    (tmp_path / "base.yaml").write_text("a: 1\n")
    (tmp_path / "r.yaml").write_text("defaults: base.yaml\na: 1\n")
    assert expand(["--check-minimal", str(tmp_path / "r.yaml")]) == 1
    assert "a repeats the value of its defaults" in capsys.readouterr().out


def test_paper_scale_extension_recipe_is_the_yarn_papers_run():
    """Llama-2-7B 4k -> 64k on PG19 documents: 400 steps at batch 64, lr 2e-5, 20 warm-up steps (YaRN, sec. 4)."""
    cfg = validate_sft_config(
        resolve_config(load_config(RECIPE_DIR / "sft-llama2-7B-4n8g-megatron-yarn-64k-pg19.yaml"))
    )
    yarn = cfg.policy.long_context
    assert (yarn.original_max_position_embeddings, yarn.factor, yarn.rope_theta) == (4096, 16.0, 10000.0)
    assert (yarn.beta_fast, yarn.beta_slow) == (32.0, 1.0)
    assert cfg.policy.max_total_sequence_length == 65536
    assert (cfg.sft.max_num_steps, cfg.policy.train_global_batch_size) == (400, 64)
    optimizer, scheduler = cfg.policy.megatron_cfg.optimizer, cfg.policy.megatron_cfg.scheduler
    assert (optimizer.lr, scheduler.lr_warmup_iters, scheduler.lr_decay_style) == (2e-5, 20, "constant")
    assert cfg.data.format == "document" and cfg.data.input_key == "text"
    tokens = cfg.sft.max_num_steps * cfg.policy.train_global_batch_size * cfg.policy.max_total_sequence_length
    assert tokens == pytest.approx(1.68e9, rel=0.01)  # ~0.1 % of Llama-2's 2T pre-training tokens
    assert cfg.cluster.gpus_per_node * cfg.cluster.num_nodes == 32


def test_the_main_job_config_extends_the_base_four_times_on_documents():
    """examples/configs/sft_long_context.yaml, the README's first command (run_sft.py's default)."""
    path = RECIPE_DIR.parents[1] / "sft_long_context.yaml"
    assert redundant_keys(path) == []
    cfg = validate_sft_config(resolve_config(load_config(path)))
    yarn = cfg.policy.long_context
    assert cfg.policy.model_name == "tiny-qwen2-base"
    assert (yarn.original_max_position_embeddings, yarn.factor, yarn.rope_theta) == (128, 4.0, 500.0)
    assert cfg.data.format == "document" and cfg.data.dataset_name == "python-stdlib"
    # Short data kept in the mix never exceeds the original window: retrieval beyond it measures the extension.
    assert all(source.max_document_tokens == 128 for source in cfg.data.blend)
    assert cfg.long_context_eval.compare_with_base and 512 in cfg.long_context_eval.passkey_lengths
