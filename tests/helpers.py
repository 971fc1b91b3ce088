"""Small builders shared by tests."""

from __future__ import annotations


def yarn_block(**changes) -> dict:
    """A complete, valid YaRN block (4x a 256-token window) with ``changes`` applied."""
    block = {
        "rope_type": "yarn",
        "rope_theta": 10000,
        "factor": 4.0,
        "original_max_position_embeddings": 256,
        "truncate": True,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1,
        "mscale_all_dim": 0,
    }
    block.update(changes)
    return block


def tiny_qwen2_config(**changes):
    """A Qwen2 config small enough for per-test models (2 heads of 32, GQA, tied embeddings)."""
    from transformers import Qwen2Config

    fields = {
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "max_position_embeddings": 64,
        "tie_word_embeddings": True,
    }
    return Qwen2Config(**(fields | changes))
