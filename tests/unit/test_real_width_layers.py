"""The real recipes' shapes at full width with one decoder layer: the conversion and TP sharding rules meet
real vocabularies (151,936 and 128,256 rows), Qwen3's head_dim 128 != hidden / heads with QK-norm, GQA 16:8,
Qwen2.5's 12:2 with QKV biases, tied embeddings and Llama 3.2's llama3 RoPE; Megatron's logits equal HF's.

The full-depth models run through every entry script in benchmarks/real_size_models.py (minutes per part);
one layer keeps every width and takes seconds.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from nemo_rl.models.megatron.hf_weights import hf_to_megatron, megatron_to_hf
from nemo_rl.models.megatron.parallel_weights import ShardLayout, merge_shards, shard_state
from nemo_rl.models.real_shape_models import REAL_SHAPES

pytestmark = pytest.mark.slow
SHAPES = ["qwen3-0.6b-shape", "qwen2.5-1.5b-shape", "llama-3.2-1b-shape"]


def one_layer(name: str):
    config = REAL_SHAPES[name].config()
    config.num_hidden_layers = 1
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # random norms and biases, so that a swapped tensor cannot go unnoticed
        for pname, param in model.named_parameters():
            if "norm" in pname or pname.endswith("bias"):
                param.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("name", SHAPES)
def test_a_real_width_layer_shards_over_tp2_bit_exact_and_megatron_computes_hfs_logits(megatron_single_process, name):
    model = one_layer(name)
    assert_tp2_shards_merge_back(model)
    assert_megatron_logits_equal_hf(model)


def assert_tp2_shards_merge_back(model) -> None:
    config = model.config
    full = hf_to_megatron(model.state_dict(), config)
    shards = {(rank, 0): shard_state(list(full), full.__getitem__, ShardLayout(2, 1, rank, 0), 1) for rank in range(2)}
    embedding = shards[(1, 0)]["embedding.word_embeddings.weight"]
    assert embedding.shape == (config.vocab_size // 2, config.hidden_size)  # vocabulary-parallel rows
    qkv = "decoder.layers.0.self_attention.linear_qkv.weight"
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    # Each rank holds half the query heads and half the KV groups, at the model's own head_dim.
    assert shards[(0, 0)][qkv].shape == (
        (config.num_attention_heads + 2 * config.num_key_value_heads) // 2 * head_dim,
        config.hidden_size,
    )
    back = megatron_to_hf(merge_shards(shards, 1, config.tie_word_embeddings), config)
    state = model.state_dict()
    assert set(back) == {k for k in state if not (config.tie_word_embeddings and k == "lm_head.weight")}
    for key, value in back.items():
        assert torch.equal(value, state[key]), key


def assert_megatron_logits_equal_hf(model) -> None:
    from nemo_rl.distributed.parallel_dims import ParallelDims
    from nemo_rl.models.megatron.model_builder import build_gpt_model, transformer_config_from_hf

    config = model.config
    mcore = build_gpt_model(config, transformer_config_from_hf(config, "float32", ParallelDims())).eval()
    missing, unexpected = mcore.load_state_dict(hf_to_megatron(model.state_dict(), config), strict=False)
    assert not [k for k in missing if not k.endswith("_extra_state")] and not unexpected
    length = 512
    ids = torch.randint(0, config.vocab_size, (1, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
        got = mcore(input_ids=ids, position_ids=torch.arange(length).unsqueeze(0), attention_mask=None)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
