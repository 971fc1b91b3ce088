"""Weight layout translation between HF causal LMs and megatron-core's GPTModel.

Megatron fuses Q/K/V into one ``linear_qkv`` whose rows are grouped per query
group ([q heads of the group, k, v] repeated), and fuses the SwiGLU gate and up
projections into ``linear_fc1``. These tensors are full (unsharded); tensor
parallel slicing happens when a rank loads them.

Supported families: Qwen2 (QKV bias), Qwen3 (QK-norm), Llama (GQA, optional
untied output layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama")


@dataclass(frozen=True)
class AttentionShape:
    num_heads: int
    num_query_groups: int
    head_dim: int
    hidden_size: int

    @classmethod
    def from_hf_config(cls, hf_config) -> "AttentionShape":
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        return cls(
            num_heads=hf_config.num_attention_heads,
            num_query_groups=hf_config.num_key_value_heads or hf_config.num_attention_heads,
            head_dim=head_dim,
            hidden_size=hf_config.hidden_size,
        )

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_query_groups


def check_supported(hf_config) -> None:
    if hf_config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type {hf_config.model_type!r} has no HF<->Megatron weight mapping; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    # Megatron's local spec has a QKV bias but no output-projection or MLP bias.
    if hf_config.model_type == "llama" and (hf_config.attention_bias or hf_config.mlp_bias):
        raise ValueError("Llama checkpoints with attention_bias or mlp_bias are not supported by the Megatron backend")


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: AttentionShape) -> torch.Tensor:
    groups = shape.num_query_groups
    trailing = q.shape[1:]
    q = q.reshape(groups, shape.heads_per_group * shape.head_dim, *trailing)
    k = k.reshape(groups, shape.head_dim, *trailing)
    v = v.reshape(groups, shape.head_dim, *trailing)
    return torch.cat([q, k, v], dim=1).reshape(-1, *trailing)


def _split_qkv(qkv: torch.Tensor, shape: AttentionShape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    trailing = qkv.shape[1:]
    q_rows = shape.heads_per_group * shape.head_dim
    grouped = qkv.reshape(shape.num_query_groups, q_rows + 2 * shape.head_dim, *trailing)
    q, k, v = torch.split(grouped, [q_rows, shape.head_dim, shape.head_dim], dim=1)
    return (
        q.reshape(-1, *trailing).contiguous(),
        k.reshape(-1, *trailing).contiguous(),
        v.reshape(-1, *trailing).contiguous(),
    )


def _layer_count(hf_config) -> int:
    return hf_config.num_hidden_layers


def hf_to_megatron(hf_state: Mapping[str, torch.Tensor], hf_config) -> dict[str, torch.Tensor]:
    """HF parameter names/layouts -> megatron-core GPTModel (local layer spec) names/layouts."""
    check_supported(hf_config)
    shape = AttentionShape.from_hf_config(hf_config)
    out = {
        "embedding.word_embeddings.weight": hf_state["model.embed_tokens.weight"],
        "decoder.final_layernorm.weight": hf_state["model.norm.weight"],
    }
    if not hf_config.tie_word_embeddings:
        out["output_layer.weight"] = hf_state["lm_head.weight"]
    for i in range(_layer_count(hf_config)):
        hf, mc = f"model.layers.{i}.", f"decoder.layers.{i}."
        attn = hf + "self_attn."
        out[mc + "self_attention.linear_qkv.weight"] = _fuse_qkv(
            hf_state[attn + "q_proj.weight"], hf_state[attn + "k_proj.weight"], hf_state[attn + "v_proj.weight"], shape
        )
        if attn + "q_proj.bias" in hf_state:
            out[mc + "self_attention.linear_qkv.bias"] = _fuse_qkv(
                hf_state[attn + "q_proj.bias"], hf_state[attn + "k_proj.bias"], hf_state[attn + "v_proj.bias"], shape
            )
        if attn + "q_norm.weight" in hf_state:
            out[mc + "self_attention.q_layernorm.weight"] = hf_state[attn + "q_norm.weight"]
            out[mc + "self_attention.k_layernorm.weight"] = hf_state[attn + "k_norm.weight"]
        out[mc + "self_attention.linear_proj.weight"] = hf_state[attn + "o_proj.weight"]
        out[mc + "input_layernorm.weight"] = hf_state[hf + "input_layernorm.weight"]
        out[mc + "pre_mlp_layernorm.weight"] = hf_state[hf + "post_attention_layernorm.weight"]
        out[mc + "mlp.linear_fc1.weight"] = torch.cat(
            [hf_state[hf + "mlp.gate_proj.weight"], hf_state[hf + "mlp.up_proj.weight"]], dim=0
        )
        out[mc + "mlp.linear_fc2.weight"] = hf_state[hf + "mlp.down_proj.weight"]
    return out


def megatron_to_hf(mcore_state: Mapping[str, torch.Tensor], hf_config) -> dict[str, torch.Tensor]:
    """Inverse of :func:`hf_to_megatron` (full tensors; exact, no arithmetic on values)."""
    check_supported(hf_config)
    shape = AttentionShape.from_hf_config(hf_config)
    out = {
        "model.embed_tokens.weight": mcore_state["embedding.word_embeddings.weight"],
        "model.norm.weight": mcore_state["decoder.final_layernorm.weight"],
    }
    if not hf_config.tie_word_embeddings:
        out["lm_head.weight"] = mcore_state["output_layer.weight"]
    for i in range(_layer_count(hf_config)):
        hf, mc = f"model.layers.{i}.", f"decoder.layers.{i}."
        attn = hf + "self_attn."
        for suffix in ("weight", "bias"):
            fused = mcore_state.get(mc + f"self_attention.linear_qkv.{suffix}")
            if fused is not None:
                q, k, v = _split_qkv(fused, shape)
                out[attn + f"q_proj.{suffix}"], out[attn + f"k_proj.{suffix}"], out[attn + f"v_proj.{suffix}"] = q, k, v
        if mc + "self_attention.q_layernorm.weight" in mcore_state:
            out[attn + "q_norm.weight"] = mcore_state[mc + "self_attention.q_layernorm.weight"]
            out[attn + "k_norm.weight"] = mcore_state[mc + "self_attention.k_layernorm.weight"]
        out[attn + "o_proj.weight"] = mcore_state[mc + "self_attention.linear_proj.weight"]
        out[hf + "input_layernorm.weight"] = mcore_state[mc + "input_layernorm.weight"]
        out[hf + "post_attention_layernorm.weight"] = mcore_state[mc + "pre_mlp_layernorm.weight"]
        gate, up = torch.chunk(mcore_state[mc + "mlp.linear_fc1.weight"], 2, dim=0)
        out[hf + "mlp.gate_proj.weight"] = gate.contiguous()
        out[hf + "mlp.up_proj.weight"] = up.contiguous()
        out[hf + "mlp.down_proj.weight"] = mcore_state[mc + "mlp.linear_fc2.weight"]
    return out
