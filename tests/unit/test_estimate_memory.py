"""tools/estimate_memory.py and nemo_rl/models/memory_estimate.py: parameter shares counted against
transformers' own model (meta device), the effect of each layout knob, and a report for every real-model recipe."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from nemo_rl.distributed.parallel_dims import ParallelDims
from nemo_rl.models.memory_estimate import Layout, estimate, stage_parameters
from nemo_rl.models.real_shape_models import REAL_SHAPES, shape_for_hub_id
from tests.helpers import load_tool

RECIPES = Path(__file__).resolve().parents[2] / "examples" / "configs" / "recipes" / "llm"
REAL_RECIPES = sorted(p for p in RECIPES.glob("*.yaml") if "tiny" not in p.name)


@pytest.mark.parametrize("name", ["qwen3-0.6b-shape", "qwen2.5-1.5b-shape", "llama-2-7b-shape"])
def test_one_device_holds_exactly_the_hf_models_parameters(name):
    config = REAL_SHAPES[name].config()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert stage_parameters(config, ParallelDims(world_size=1)) == sum(p.numel() for p in model.parameters())


def test_tensor_parallel_ranks_share_the_matrices_and_replicate_the_norms():
    config = REAL_SHAPES["qwen3-0.6b-shape"].config()
    whole, half = stage_parameters(config, ParallelDims(1)), stage_parameters(config, ParallelDims(2, tp=2))
    replicated = config.num_hidden_layers * (2 * config.hidden_size + 2 * config.head_dim) + config.hidden_size
    assert 2 * half - replicated == whole


def test_each_layout_knob_moves_its_own_part():
    config = REAL_SHAPES["qwen3-0.6b-shape"].config()
    base = Layout(ParallelDims(8, tp=2, cp=2), "bfloat16", 32_768, 1, recompute=False, distributed_optimizer=False)
    plain = estimate(config, base)
    assert estimate(config, dataclasses.replace(base, recompute=True)).activations < plain.activations / 5
    assert estimate(config, dataclasses.replace(base, distributed_optimizer=True)).optimizer * 4 == plain.optimizer
    longer = estimate(config, dataclasses.replace(base, sequence_length=65_536))
    assert longer.activations == pytest.approx(2 * plain.activations, rel=1e-6)
    assert longer.weights == plain.weights
    colocated = estimate(config, dataclasses.replace(base, vllm_memory_fraction=0.5, device_gib=80))
    assert colocated.vllm == 40 * 1024**3 and colocated.peak >= colocated.generation


def test_every_real_model_recipe_names_a_shape_and_gets_a_report(capsys):
    assert REAL_RECIPES
    main = load_tool("estimate_memory")
    for recipe in REAL_RECIPES:
        assert main([str(recipe)]) == 0, recipe.name
    printed = capsys.readouterr().out
    print(printed)  # the table for each recipe, in the test log
    for recipe in REAL_RECIPES:
        assert f"{recipe.name}:" in printed
    assert printed.count("fits in 80 GiB") == len(REAL_RECIPES)


def test_a_recipe_model_without_a_shape_is_not_silently_guessed():
    assert shape_for_hub_id("Qwen/Qwen3-0.6B") is REAL_SHAPES["qwen3-0.6b-shape"]
    assert shape_for_hub_id("Qwen/Qwen3-32B") is None


def test_a_runs_layout_counts_the_rows_it_really_trains_and_the_reference_models_host_copy():
    """A DPO micro-batch of one pair is two rows; a packed one is one row of the full length whatever the micro
    batch; DPO and GRPO keep the starting weights on the host (plus the live ones while the reference scores)."""
    from nemo_rl.config.loader import load_config, resolve_config
    from nemo_rl.config.schema import validate_dpo_config, validate_sft_config

    dpo = validate_dpo_config(resolve_config(load_config(RECIPES / "dpo-qwen3-0.6B-1n8g-megatron-yarn-64k.yaml")))
    sft = validate_sft_config(resolve_config(load_config(RECIPES / "sft-qwen3-0.6B-1n8g-megatron-yarn-64k.yaml")))
    dpo_layout, sft_layout = Layout.of_run(dpo), Layout.of_run(sft)
    assert (dpo_layout.micro_batch, dpo_layout.reference_model) == (2 * dpo.policy.train_micro_batch_size, True)
    assert sft.policy.sequence_packing.enabled and (sft_layout.micro_batch, sft_layout.reference_model) == (1, False)
    config = REAL_SHAPES["qwen3-0.6b-shape"].config()
    found = estimate(config, dpo_layout)
    assert found.host_reference == 2 * found.weights and estimate(config, sft_layout).host_reference == 0
    assert found.peak == max(found.training, found.generation), "host memory is not the device's"
