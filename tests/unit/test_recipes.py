"""Every recipe in the tree loads, resolves and validates with its algorithm's validator."""

from __future__ import annotations

from pathlib import Path

import pytest

from nemo_rl.utils.config import load_config, resolve_config
from nemo_rl.utils.config_schema import validate_grpo_config, validate_sft_config

RECIPES = sorted((Path(__file__).resolve().parents[2] / "examples" / "configs" / "recipes" / "llm").glob("*.yaml"))

# A recipe's file name starts with its algorithm: `sft-...yaml`, `grpo-...yaml`.
VALIDATORS = {"sft-": validate_sft_config, "grpo-": validate_grpo_config}


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
        validator_for(Path("dpo-tiny.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(recipe):
    cfg = validator_for(recipe)(resolve_config(load_config(recipe)))
    if recipe.name.startswith("grpo-"):
        assert cfg.policy.generation is not None
    if "yarn" in recipe.name:
        yarn = cfg.policy.long_context
        assert yarn is not None
        assert yarn.factor * yarn.original_max_position_embeddings >= cfg.policy.max_total_sequence_length
