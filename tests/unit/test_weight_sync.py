"""Refit buckets: bounded, every tensor once and in order, fused modules whole; a stage streams what a full export gives."""

from __future__ import annotations

import pytest
import torch

from nemo_rl.models.generation.weight_sync import bucketed, fusion_key
from nemo_rl.models.megatron.hf_weights import hf_to_megatron, megatron_to_hf
from nemo_rl.models.megatron.parallel_weights import ShardLayout, layer_groups, shard_state, stage_tensors
from tests.unit.test_hf_weights import _model
from tests.unit.test_parallel_weights import FAMILIES, _local_names


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _hf_tensors(name: str) -> list[tuple[str, torch.Tensor]]:
    return list(_model(name).state_dict().items())


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("bucket_bytes", [1, 40_000, 300_000, 10**9])
def test_buckets_are_bounded_and_send_every_tensor_once_in_order(name, bucket_bytes):
    tensors = _hf_tensors(name)
    buckets = list(bucketed(iter(tensors), bucket_bytes))
    sent = [(n, t) for bucket in buckets for n, t in bucket.items()]
    assert [n for n, _ in sent] == [n for n, _ in tensors]  # each once, in the order given
    assert all(t is original for (_, t), (_, original) in zip(sent, tensors))
    keys_per_bucket = [{fusion_key(n) for n in bucket} for bucket in buckets]
    for first, second in zip(keys_per_bucket, keys_per_bucket[1:]):
        assert not first & second  # no fused module (q/k/v, gate/up) is split between buckets
    for bucket in buckets:
        keys = {fusion_key(n) for n in bucket}
        # Over the bound only as a single fused module that is larger by itself.
        assert _nbytes(bucket.values()) <= bucket_bytes or len(keys) == 1
    if bucket_bytes == 10**9:
        assert len(buckets) == 1
    if bucket_bytes == 1:
        assert len(buckets) == len({fusion_key(n) for n, _ in tensors})


def test_fused_modules_group_qkv_weights_and_biases_and_gate_up():
    layer = "model.layers.3"
    qkv = {fusion_key(f"{layer}.self_attn.{p}_proj.{s}") for p in "qkv" for s in ("weight", "bias")}
    assert qkv == {f"{layer}.self_attn.qkv_proj"}
    assert fusion_key(f"{layer}.mlp.gate_proj.weight") == fusion_key(f"{layer}.mlp.up_proj.weight")
    assert fusion_key(f"{layer}.self_attn.o_proj.weight") == f"{layer}.self_attn.o_proj.weight"


def test_a_fused_module_out_of_order_is_refused():
    t = torch.zeros(2)
    names = ["a.q_proj.weight", "a.o_proj.weight", "a.k_proj.weight"]
    with pytest.raises(ValueError, match="a.qkv_proj"):
        list(bucketed(((n, t) for n in names), 10**6))


def test_a_bucket_size_that_is_not_positive_names_the_config_field():
    with pytest.raises(ValueError, match="policy.generation.refit_bucket_mib"):
        list(bucketed(iter([]), 0))


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize(("tp", "pp"), [(1, 1), (2, 2)])
def test_stages_streamed_layer_by_layer_give_the_full_export(name, tp, pp):
    """What the policy workers stream at refit (each stage merged over TP, converted a layer at a time) is
    bit for bit the model's own HF state, each tensor once."""
    model = _model(name)
    config = model.config
    layers, tied = config.num_hidden_layers, config.tie_word_embeddings
    full = hf_to_megatron(model.state_dict(), config)
    streamed: dict[str, torch.Tensor] = {}
    for pp_rank in range(pp):
        per_tp = []
        for tp_rank in range(tp):
            layout = ShardLayout(tp, pp, tp_rank, pp_rank)
            per_tp.append(shard_state(_local_names(full, layout, layers, tied), full.__getitem__, layout, layers))
        stage = stage_tensors(
            per_tp[0],
            lambda local, shards=per_tp: [s[local] for s in shards],
            ShardLayout(tp, pp, 0, pp_rank),
            layers,
            tied,
        )
        for group in layer_groups(stage):
            for hf_name, tensor in megatron_to_hf(group, config).items():
                assert hf_name not in streamed, hf_name
                streamed[hf_name] = tensor
    expected = megatron_to_hf(full, config)
    assert list(streamed) != [] and set(streamed) == set(expected)
    for key, value in expected.items():
        assert torch.equal(streamed[key], value), key
        assert torch.equal(value, model.state_dict()[key]), key
