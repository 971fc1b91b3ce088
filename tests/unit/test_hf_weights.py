"""HF <-> Megatron weight mapping: exact round trips and equal logits, per model family."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from nemo_rl.models.megatron.hf_weights import hf_to_megatron, megatron_to_hf

YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "truncate": True,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 0.0,
}

COMMON = dict(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    rms_norm_eps=1e-6,
    max_position_embeddings=256,
)


def _families(rope):
    return {
        "qwen2-tied": (Qwen2ForCausalLM, Qwen2Config(**COMMON, tie_word_embeddings=True, rope_parameters=dict(rope))),
        "qwen3-untied": (
            Qwen3ForCausalLM,
            Qwen3Config(**COMMON, tie_word_embeddings=False, rope_parameters=dict(rope)),
        ),
        "llama-untied": (
            LlamaForCausalLM,
            LlamaConfig(**COMMON, tie_word_embeddings=False, rope_parameters=dict(rope)),
        ),
    }


def _model(name, rope=YARN):
    cls, config = _families(rope)[name]
    torch.manual_seed(0)
    model = cls(config).eval()
    # Random (non-trivial) norms and biases so a swapped tensor cannot go unnoticed.
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "norm" in pname or pname.endswith("bias"):
                param.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("name", ["qwen2-tied", "qwen3-untied", "llama-untied"])
def test_round_trip_is_bit_exact(name):
    model = _model(name)
    hf_state = model.state_dict()
    back = megatron_to_hf(hf_to_megatron(hf_state, model.config), model.config)
    expected = {k: v for k, v in hf_state.items() if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    assert set(back) == set(expected)
    for key, value in expected.items():
        assert torch.equal(back[key], value), key


@pytest.mark.parametrize("name", ["qwen2-tied", "qwen3-untied", "llama-untied"])
@pytest.mark.parametrize(
    "rope",
    [
        YARN,
        {"rope_type": "default", "rope_theta": 10000.0},
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        # Llama 3.2's remapping: at head_dim 32 the slowest pairs' wavelengths pass 8192, so all three bands occur.
        {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ],
    ids=["yarn", "plain", "linear", "llama3"],
)
def test_megatron_logits_equal_hf(megatron_single_process, name, rope):
    from nemo_rl.distributed.parallel_dims import ParallelDims
    from nemo_rl.models.megatron.model_builder import build_gpt_model, transformer_config_from_hf

    model = _model(name, rope)
    tf_config = transformer_config_from_hf(model.config, "float32", ParallelDims())
    mcore = build_gpt_model(model.config, tf_config).eval()
    missing, unexpected = mcore.load_state_dict(hf_to_megatron(model.state_dict(), model.config), strict=False)
    assert not [k for k in missing if not k.endswith("_extra_state")] and not unexpected

    length = 256  # 4x the YaRN model's original window
    ids = torch.randint(0, 256, (2, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
        got = mcore(
            input_ids=ids,
            position_ids=torch.arange(length).expand(2, -1),
            attention_mask=None,
        )
    # float32 with different op order (fused QKV, fused gate/up): ~1e-6 relative.
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert getattr(tf_config, "yarn_rotary_scaling_factor", None) == (4.0 if rope["rope_type"] == "yarn" else None)
