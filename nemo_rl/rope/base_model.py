"""The base model's own RoPE against the run's block: what a run may not do to a model's pretraining RoPE."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nemo_rl.rope.blocks import OVERRIDES_PATH, checked_rope_block
from nemo_rl.rope.hf_config import hf_rope_parameters
from nemo_rl.rope.megatron_config import megatron_rope_fields
from nemo_rl.rope.rules import effective_overrides
from nemo_rl.utils.errors import ConfigError


def base_model_rope_errors(
    model_config: Any,
    model_field: str,
    overrides: Mapping[str, Any] | None,
    max_total_sequence_length: int,
    megatron_enabled: bool,
) -> list[str]:
    """What the run's block would do to the RoPE the base model (``model_config``, named by ``model_field``)
    was trained with.

    A base that ships its own scaling (Llama 3.x's ``llama3`` x8/x32, a YaRN
    checkpoint) learnt every position with it. A run block of another type is
    written *instead of* it in every engine (HF, Megatron and vLLM alike, so
    they still agree with each other), which silently retrains the model on
    other frequencies; so it is refused, as ``apply_rope_scaling`` refuses to
    compound without being asked. Without a block, the base's own RoPE must be
    one megatron-core can build.
    """
    params = hf_rope_parameters(model_config)
    base_type = params.get("rope_type", "default")
    block = checked_rope_block(effective_overrides(overrides, max_total_sequence_length))
    if block is not None and base_type != "default" and block.rope_type != base_type:
        shipped = ", ".join(
            f"{k} {params[k]:g}"
            for k in ("factor", "original_max_position_embeddings")
            if isinstance(params.get(k), (int, float))
        )
        return [
            f"{block.path}.rope_type: {block.rope_type!r} would replace the RoPE scaling {model_field} ships "
            f"(config.json: rope_type {base_type!r}{', ' + shipped if shipped else ''}), which the model was trained "
            "with, and change every position's rotation. Train with the model's own RoPE by removing the block "
            f"(`~{OVERRIDES_PATH}` on the command line), or extend it in kind: rope_type: {base_type} with a "
            "larger factor"
        ]
    if block is None and megatron_enabled:
        try:
            megatron_rope_fields(model_config)
        except (ValueError, ConfigError) as error:
            return [f"{model_field}: {error}"]
    return []
