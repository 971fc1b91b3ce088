"""Weight layout translation between HF causal LMs and megatron-core's GPTModel.

Megatron fuses Q/K/V into one ``linear_qkv`` whose rows are grouped per query
group ([q heads of the group, k, v] repeated), and fuses the SwiGLU gate and up
projections into ``linear_fc1``. These tensors are full (unsharded); tensor
parallel slicing happens when a rank loads them.

Supported families: Qwen2 (QKV bias), Qwen3 (QK-norm), Llama (GQA, optional
untied output layer).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama")


@dataclass(frozen=True)
class AttentionShape:
    num_heads: int
    num_query_groups: int
    head_dim: int
    hidden_size: int

    @classmethod
    def from_hf_config(cls, hf_config) -> AttentionShape:
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


# One-to-one renames (same tensor, different name); optional ones are mapped when present.
_GLOBAL_RENAMES = (
    ("model.embed_tokens.weight", "embedding.word_embeddings.weight"),
    ("model.norm.weight", "decoder.final_layernorm.weight"),
    ("lm_head.weight", "output_layer.weight"),  # absent when embeddings are tied
    ("score.weight", "output_layer.score.weight"),  # reward models (*ForSequenceClassification), see reward_head
)
_LAYER_RENAMES = (
    ("self_attn.o_proj.weight", "self_attention.linear_proj.weight"),
    ("self_attn.q_norm.weight", "self_attention.q_layernorm.weight"),  # Qwen3 QK-norm
    ("self_attn.k_norm.weight", "self_attention.k_layernorm.weight"),
    ("input_layernorm.weight", "input_layernorm.weight"),
    ("post_attention_layernorm.weight", "pre_mlp_layernorm.weight"),
    ("mlp.down_proj.weight", "mlp.linear_fc2.weight"),
)


def _renames(hf_config) -> list[tuple[str, str]]:
    pairs = [(hf, mc) for hf, mc in _GLOBAL_RENAMES if not (hf == "lm_head.weight" and hf_config.tie_word_embeddings)]
    for i in range(hf_config.num_hidden_layers):
        pairs += [(f"model.layers.{i}.{hf}", f"decoder.layers.{i}.{mc}") for hf, mc in _LAYER_RENAMES]
    return pairs


def hf_to_megatron(hf_state: Mapping[str, torch.Tensor], hf_config) -> dict[str, torch.Tensor]:
    """HF parameter names/layouts -> megatron-core GPTModel (local layer spec) names/layouts."""
    check_supported(hf_config)
    shape = AttentionShape.from_hf_config(hf_config)
    out = {mc: hf_state[hf] for hf, mc in _renames(hf_config) if hf in hf_state}
    for i in range(hf_config.num_hidden_layers):
        attn, mc = f"model.layers.{i}.self_attn.", f"decoder.layers.{i}."
        for suffix in ("weight", "bias"):
            if f"{attn}q_proj.{suffix}" in hf_state:
                out[f"{mc}self_attention.linear_qkv.{suffix}"] = _fuse_qkv(
                    *(hf_state[f"{attn}{p}_proj.{suffix}"] for p in "qkv"), shape
                )
        mlp = f"model.layers.{i}.mlp."
        out[f"{mc}mlp.linear_fc1.weight"] = torch.cat(
            [hf_state[mlp + "gate_proj.weight"], hf_state[mlp + "up_proj.weight"]]
        )
    return out


def megatron_to_hf(mcore_state: Mapping[str, torch.Tensor], hf_config) -> dict[str, torch.Tensor]:
    """Inverse of :func:`hf_to_megatron` (full tensors; exact, no arithmetic on values).

    ``mcore_state`` may be part of a model made of whole layers (one pipeline
    stage, one layer): refit streams a live model that way.
    """
    check_supported(hf_config)
    shape = AttentionShape.from_hf_config(hf_config)
    out = {hf: mcore_state[mc] for hf, mc in _renames(hf_config) if mc in mcore_state}
    for i in range(hf_config.num_hidden_layers):
        attn, mc = f"model.layers.{i}.self_attn.", f"decoder.layers.{i}."
        for suffix in ("weight", "bias"):
            fused = mcore_state.get(f"{mc}self_attention.linear_qkv.{suffix}")
            if fused is not None:
                for p, tensor in zip("qkv", _split_qkv(fused, shape)):
                    out[f"{attn}{p}_proj.{suffix}"] = tensor
        fc1 = mcore_state.get(f"{mc}mlp.linear_fc1.weight")
        if fc1 is not None:
            gate, up = torch.chunk(fc1, 2, dim=0)
            out[f"model.layers.{i}.mlp.gate_proj.weight"] = gate.contiguous()
            out[f"model.layers.{i}.mlp.up_proj.weight"] = up.contiguous()
    return out
