"""The real recipes' shapes, built from published numbers, have the model cards' parameter counts and the
features the code paths must handle (counted on the meta device: nothing is allocated)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from nemo_rl.models.real_shape_models import REAL_SHAPES


def matches(count: int, printed: str) -> bool:
    """``count`` is what the card prints as ``printed`` billions, to its last digit (cards round or truncate)."""
    return abs(count / 1e9 - float(printed)) < 10 ** -len(printed.split(".")[1])


@pytest.mark.parametrize("name", sorted(REAL_SHAPES))
def test_the_shape_has_the_model_cards_parameter_count(name):
    shape = REAL_SHAPES[name]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shape.config())
    total = sum(p.numel() for p in model.parameters())  # tied embeddings are counted once
    embedding = model.get_input_embeddings().weight.numel()
    total_printed, non_embedding_printed = shape.published_billions
    assert matches(total, total_printed), total
    if non_embedding_printed is not None:
        assert matches(total - embedding, non_embedding_printed), total - embedding


def test_the_qwen3_shape_has_what_the_tiny_models_lack():
    config = REAL_SHAPES["qwen3-0.6b-shape"].config()
    assert config.model_type == "qwen3" and config.tie_word_embeddings
    assert config.head_dim == 128 != config.hidden_size // config.num_attention_heads
    assert config.vocab_size == 151_936 and config.vocab_size % 2 == 0  # splits over TP=2 without padding
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert model.model.layers[0].self_attn.q_norm.weight.shape == (128,)  # QK-norm


def test_the_llama_shape_keeps_its_own_rope_scaling():
    params = REAL_SHAPES["llama-3.2-1b-shape"].config().rope_parameters
    assert (params["rope_type"], params["factor"], params["original_max_position_embeddings"]) == ("llama3", 32.0, 8192)
