"""The RoPE block in megatron-core's terms, and the RoPE types megatron-core cannot build."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from nemo_rl.rope.blocks import DYNAMIC_YARN, YARN, Llama3Scaling, YarnScaling, rope_block, split_structural
from nemo_rl.rope.hf_config import hf_rope_parameters, rope_theta_of

# What megatron-core 0.16's GPTModel can build: plain, linear and Llama 3's RoPE (GPTModel arguments) and
# YarnRotaryEmbedding.
LLAMA3 = "llama3"
MEGATRON_ROPE_TYPES = ("default", "linear", LLAMA3, YARN)
# megatron-core 0.16 takes only Llama 3's factor (``rope_scaling_factor``); the rest of the remapping is fixed
# at these values (``RotaryEmbedding._apply_scaling``'s defaults), which Llama 3.1 and 3.2 ship.
MEGATRON_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def megatron_rope_type_errors(overrides: Mapping[str, Any] | None) -> list[str]:
    """Run-time refusal, at config time, of RoPE types megatron-core cannot build (see ``megatron_rope_fields``)."""
    block, errors = rope_block(overrides)
    if errors or block is None or block.rope_type == DYNAMIC_YARN:
        return []  # spelling errors and Dynamic-YaRN are reported by validate_long_context
    if block.rope_type == LLAMA3:
        return llama3_errors(block.params, block.path)
    if block.rope_type in MEGATRON_ROPE_TYPES:
        return []
    return [_megatron_type_error(block.rope_type, block.path)]


def llama3_errors(params: Mapping[str, Any], path: str) -> list[str]:
    """A ``llama3`` block megatron-core would build with other values than it says (see ``MEGATRON_LLAMA3_FIXED``).

    Missing or mistyped fields are ``Llama3Scaling``'s to report; only values megatron-core cannot take are here.
    """
    return [
        f"{path}.{name}: {params[name]!r}, but megatron-core 0.16 builds Llama 3's RoPE only with "
        f"{name}={fixed:g} (it takes nothing but the factor); the trainer would compute different RoPE from HF "
        "and vLLM. Use a base model with Llama 3.1/3.2's RoPE values, or rope_type: yarn"
        for name, fixed in MEGATRON_LLAMA3_FIXED.items()
        if isinstance(params.get(name), (int, float)) and not math.isclose(params[name], fixed)
    ]


def _megatron_type_error(rope_type: Any, path: str) -> str:
    return (
        f"{path}.rope_type: {rope_type!r} cannot be built by megatron-core 0.16 (it builds one fixed RoPE table: "
        f"rope_type {', '.join(MEGATRON_ROPE_TYPES)}); the trainer would compute different RoPE from HF and vLLM. "
        f"Use rope_type: {YARN} (or linear)"
    )


def megatron_rope_fields(hf_config: Any) -> dict[str, Any]:
    """megatron-core ``TransformerConfig`` attributes for the HF config's RoPE block.

    megatron-core 0.16 takes ``mscale(s, m) / mscale(s, m_all)`` whenever both
    are set, which disagrees with HF/vLLM when either is 0 (e.g. mscale=0.707,
    mscale_all_dim=0). The canonical attention factor is therefore passed as an
    equivalent ``(yarn_mscale, 0)`` pair, for which Megatron computes exactly it.
    """
    params = hf_rope_parameters(hf_config)
    rope_type = params.get("rope_type", "default")
    if rope_type not in MEGATRON_ROPE_TYPES:
        raise ValueError(_megatron_type_error(rope_type, "config.json rope_parameters"))
    if rope_type == LLAMA3:
        Llama3Scaling.from_dict(split_structural(params)[0], path="config.json rope_parameters")
        if errors := llama3_errors(params, "config.json rope_parameters"):
            raise ValueError("; ".join(errors))
    if rope_type != YARN:
        return {}  # plain, linear and Llama 3 RoPE are GPTModel arguments, see megatron_gpt_rope_kwargs
    partial = params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", None))
    if partial is not None and partial != 1.0:
        # YarnRotaryEmbedding sizes its frequencies by kv_channels and ignores rotary_percent, so it
        # would rotate every channel where HF/vLLM rotate only the first partial_rotary_factor of them.
        raise ValueError(
            f"partial_rotary_factor={partial}: megatron-core's YarnRotaryEmbedding rotates all kv_channels "
            "(it ignores rotary_percent), so the Megatron backend cannot run rope_type=yarn with partial "
            "rotary embeddings; HF and vLLM would rotate a different set of channels"
        )
    yarn = YarnScaling.from_dict(split_structural(params)[0], path="config.json rope_parameters")
    return {
        "yarn_rotary_scaling_factor": yarn.factor,
        "yarn_original_max_position_embeddings": yarn.original_max_position_embeddings,
        "yarn_beta_fast": yarn.beta_fast,
        "yarn_beta_slow": yarn.beta_slow,
        "yarn_mscale": (yarn.attention_factor - 1.0) / (0.1 * math.log(yarn.factor)),
        "yarn_mscale_all_dim": 0.0,
        "yarn_correction_range_round_to_int": yarn.truncate,
    }


def megatron_gpt_rope_kwargs(hf_config: Any) -> dict[str, Any]:
    """megatron-core ``GPTModel`` constructor arguments for the HF config's RoPE block.

    Linear position interpolation is megatron's ``seq_len_interpolation_factor``
    (positions divided by the factor, i.e. ``inv_freq / factor``); Llama 3's
    remapping is ``rope_scaling`` with its factor.
    """
    params = hf_rope_parameters(hf_config)
    fields = megatron_rope_fields(hf_config)  # validates the block for Megatron
    rope_type = params.get("rope_type")
    llama3 = {"rope_scaling": True, "rope_scaling_factor": float(params["factor"])} if rope_type == LLAMA3 else {}
    return {
        "position_embedding_type": "yarn" if fields else "rope",
        "rotary_base": rope_theta_of(hf_config),
        "rotary_percent": params.get("partial_rotary_factor", 1.0),
        "seq_len_interpolation_factor": params["factor"] if rope_type == "linear" else None,
    } | llama3
