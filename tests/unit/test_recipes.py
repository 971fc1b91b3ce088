"""Every recipe in the tree loads, resolves and validates."""

from __future__ import annotations

from pathlib import Path

import pytest

from nemo_rl.utils.config import load_config, resolve_config
from nemo_rl.utils.config_schema import validate_sft_config

RECIPES = sorted((Path(__file__).resolve().parents[2] / "examples" / "configs" / "recipes" / "llm").glob("*.yaml"))


def test_there_are_recipes():
    assert RECIPES


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(recipe):
    assert recipe.name.startswith("sft-"), "only SFT recipes exist so far; add the algorithm's validator here"
    cfg = validate_sft_config(resolve_config(load_config(recipe)))
    if "yarn" in recipe.name:
        yarn = cfg.policy.long_context
        assert yarn is not None
        assert yarn.factor * yarn.original_max_position_embeddings >= cfg.policy.max_total_sequence_length
