"""A run's RoPE block against the RoPE its base model ships (nemo_rl/rope/base_model.py), on Llama-3.2-1B's
published config (its ``llama3`` x32 over 8,192 tokens) and Qwen3-0.6B's plain RoPE."""

from __future__ import annotations

import pytest

from nemo_rl.models.real_shape_models import REAL_SHAPES
from nemo_rl.rope.base_model import base_model_rope_errors
from tests.helpers import yarn_block

LLAMA = REAL_SHAPES["llama-3.2-1b-shape"].config()
QWEN = REAL_SHAPES["qwen3-0.6b-shape"].config()


def errors(config, overrides, max_len=16384, megatron=True):
    return base_model_rope_errors(config, "policy.model_name (m)", overrides, max_len, megatron)


def test_a_llama3_base_trains_with_its_own_rope_on_megatron():
    assert errors(LLAMA, None) == []


def test_a_yarn_block_on_a_llama3_base_is_refused_with_the_way_out():
    (message,) = errors(LLAMA, {"rope_scaling": yarn_block(rope_theta=5e5, original_max_position_embeddings=4096)})
    assert message.startswith(
        "policy.hf_config_overrides.rope_scaling.rope_type: 'yarn' would replace the RoPE scaling "
        "policy.model_name (m) ships (config.json: rope_type 'llama3', factor 32, "
        "original_max_position_embeddings 8192)"
    )
    assert "`~policy.hf_config_overrides`" in message and "rope_type: llama3 with a larger factor" in message


def test_extending_a_llama3_base_in_kind_is_allowed():
    params = dict(LLAMA.rope_parameters) | {"factor": 64.0}
    assert errors(LLAMA, {"rope_scaling": params}) == []


def test_a_yarn_block_that_extends_nothing_is_dropped_so_there_is_nothing_to_refuse():
    assert (
        errors(LLAMA, {"rope_scaling": yarn_block(rope_theta=5e5, original_max_position_embeddings=4096)}, max_len=4096)
        == []
    )


def test_a_plain_rope_base_takes_any_block():
    assert errors(QWEN, {"rope_scaling": yarn_block(rope_theta=1e6, original_max_position_embeddings=4096)}) == []


@pytest.mark.parametrize("megatron", [True, False])
def test_a_llama3_base_megatron_cannot_build_is_refused_only_for_megatron(megatron):
    config = type(LLAMA).from_dict(
        LLAMA.to_dict() | {"rope_parameters": LLAMA.rope_parameters | {"low_freq_factor": 2.0}}
    )
    found = errors(config, None, megatron=megatron)
    if not megatron:
        assert found == []
        return
    (message,) = found
    assert message.startswith("policy.model_name (m): config.json rope_parameters.low_freq_factor: 2.0, but megatron")
