"""TP x PP sharding of Megatron state dicts: the rules match megatron-core's own parameters, and round trips are exact."""

from __future__ import annotations

import re

import pytest
import torch

from nemo_rl.models.megatron.hf_weights import hf_to_megatron, megatron_to_hf
from nemo_rl.models.megatron.parallel_weights import (
    EMBEDDING,
    TIED_OUTPUT,
    ShardLayout,
    merge_shards,
    read_checkpoint_model_shards,
    shard_file_name,
    shard_state,
    tp_partition_dim,
    tp_slice,
)
from tests.unit.test_hf_weights import _model

FAMILIES = ["qwen2-tied", "qwen3-untied", "llama-untied"]


def test_partition_table_matches_megatron_parameter_attributes(megatron_single_process):
    """megatron-core marks each TP-split parameter with tensor_model_parallel and partition_dim."""
    from nemo_rl.distributed.parallel_dims import ParallelDims
    from nemo_rl.models.megatron.model_builder import build_gpt_model, transformer_config_from_hf

    for name in ("qwen2-tied", "qwen3-untied"):
        config = _model(name).config
        mcore = build_gpt_model(config, transformer_config_from_hf(config, "float32", ParallelDims()))
        for pname, param in mcore.named_parameters():
            expected = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
            assert tp_partition_dim(pname) == expected, pname


def _local_names(full: dict, layout: ShardLayout, num_layers: int, tied: bool) -> list[str]:
    """The names megatron-core gives this rank's parameters (stage-local layer numbers)."""
    layers = layout.stage_layers(num_layers)
    first, last = layout.pp_rank == 0, layout.pp_rank == layout.pp_size - 1
    names = []
    for name in full:
        match = re.match(r"^decoder\.layers\.(\d+)\.(.*)$", name)
        if match:
            if int(match[1]) in layers:
                names.append(f"decoder.layers.{int(match[1]) - layers.start}.{match[2]}")
        elif name == EMBEDDING and first or name != EMBEDDING and last:
            names.append(name)
    if tied and last and layout.pp_size > 1:
        names.append(TIED_OUTPUT)
    return names


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (1, 2), (2, 2)])
def test_hf_to_sharded_megatron_to_hf_is_bit_exact(name, tp, pp):
    model = _model(name)
    config = model.config
    full = hf_to_megatron(model.state_dict(), config)
    shards = {}
    for tp_rank in range(tp):
        for pp_rank in range(pp):
            layout = ShardLayout(tp, pp, tp_rank, pp_rank)
            names = _local_names(full, layout, config.num_hidden_layers, config.tie_word_embeddings)
            shards[(tp_rank, pp_rank)] = shard_state(names, full.__getitem__, layout, config.num_hidden_layers)
    some = shards[(tp - 1, 0)]["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert some.shape[0] == full["decoder.layers.0.self_attention.linear_qkv.weight"].shape[0] // tp
    merged = merge_shards(shards, config.num_hidden_layers, config.tie_word_embeddings)
    assert set(merged) == set(full)
    for key in full:
        assert torch.equal(merged[key], full[key]), key
    back = megatron_to_hf(merged, config)
    for key, value in back.items():
        assert torch.equal(value, model.state_dict()[key]), key


def test_glu_shard_holds_its_slice_of_gate_and_of_up():
    gate, up = torch.arange(8.0).reshape(4, 2), 100 + torch.arange(8.0).reshape(4, 2)
    full = torch.cat([gate, up])
    shard = tp_slice(full, "decoder.layers.0.mlp.linear_fc1.weight", ShardLayout(tp_size=2, tp_rank=1))
    assert torch.equal(shard, torch.cat([gate[2:], up[2:]]))


def test_uneven_splits_name_the_setting_and_the_fix():
    with pytest.raises(ValueError, match="tensor_model_parallel_size=4; use a divisor"):
        tp_slice(torch.zeros(6, 2), "output_layer.weight", ShardLayout(tp_size=4))
    with pytest.raises(ValueError, match="pipeline_model_parallel_size=4 does not divide the model's 6 layers"):
        ShardLayout(pp_size=4).stage_layers(6)


def test_checkpoint_shard_files_must_be_complete(tmp_path):
    torch.save({"model": {"a": torch.zeros(1)}}, tmp_path / shard_file_name(0, 0))
    torch.save({"model": {"a": torch.zeros(1)}}, tmp_path / shard_file_name(1, 1))
    with pytest.raises(FileNotFoundError, match="missing policy_tp00_pp01.pt, policy_tp01_pp00.pt"):
        read_checkpoint_model_shards(tmp_path)
    with pytest.raises(FileNotFoundError, match="no policy_tp"):
        read_checkpoint_model_shards(tmp_path / "empty")
