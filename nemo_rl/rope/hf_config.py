"""The RoPE block in transformers' terms: a patched HF config, and reading the block back from one."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from nemo_rl.rope.blocks import (
    BLOCK_KEYS,
    DynamicNTKScaling,
    RopeBlock,
    YarnScaling,
    checked_rope_block,
    split_structural,
)
from nemo_rl.rope.rules import effective_overrides


def apply_hf_config_overrides(
    hf_config: Any, overrides: Mapping[str, Any] | None, max_total_sequence_length: int
) -> Any:
    """A new HF config carrying the run's effective overrides.

    The RoPE block is written whole (with ``rope_theta``) under the name the
    installed transformers uses: assigning a partial block after construction
    loses ``rope_theta`` in transformers 5. A YaRN model's
    ``max_position_embeddings`` becomes the extended window (as YaRN checkpoints
    such as DeepSeek-V3 ship it) unless the overrides set it explicitly.
    """
    effective = effective_overrides(overrides, max_total_sequence_length)
    if not effective:
        return hf_config
    block = checked_rope_block(effective)
    data = hf_config.to_dict()
    data.update({k: v for k, v in effective.items() if k not in BLOCK_KEYS})
    if block is not None:
        params = _typed_params(block)
        if "rope_parameters" in data:  # transformers >= 5
            data.pop("rope_scaling", None)
            data["rope_parameters"] = params
        else:
            data["rope_theta"] = params.pop("rope_theta", data.get("rope_theta"))
            data["rope_scaling"] = params
        if "max_position_embeddings" not in effective:
            data["max_position_embeddings"] = _hf_max_position_embeddings(block, max_total_sequence_length, data)
    return type(hf_config).from_dict(data)


def _typed_params(block: RopeBlock) -> dict[str, Any]:
    """The block with every field in its declared type (transformers 4 warns on ``beta_fast: 32``, an int)."""
    if block.scaling is None:
        return dict(block.params)
    return block.scaling.to_block() | split_structural(block.params)[1]


def _hf_max_position_embeddings(block: RopeBlock, max_total_sequence_length: int, data: Mapping[str, Any]) -> int:
    """What ``max_position_embeddings`` must say for HF to compute the block's RoPE.

    YaRN: the extended window (as YaRN checkpoints such as DeepSeek-V3 ship it).
    Dynamic NTK: transformers reads the original window from this field, so it
    must be the block's ``original_max_position_embeddings``.
    """
    scaling = block.scaling
    if type(scaling) is YarnScaling:
        return max(math.ceil(scaling.factor * scaling.original_max_position_embeddings), max_total_sequence_length)
    if isinstance(scaling, DynamicNTKScaling):
        return scaling.original_max_position_embeddings
    return data["max_position_embeddings"]


def hf_rope_parameters(hf_config: Any) -> dict[str, Any]:
    """The RoPE block of an HF config, whichever attribute name its transformers version uses."""
    params = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    if "type" in params:
        params.setdefault("rope_type", params.pop("type"))
    return params


def rope_theta_of(hf_config: Any) -> float:
    theta = hf_rope_parameters(hf_config).get("rope_theta") or getattr(hf_config, "rope_theta", None)
    if theta is None:
        raise ValueError(f"{type(hf_config).__name__} has no rope_theta")
    return float(theta)
