"""The RoPE block in vLLM's terms: ``LLM(...)`` keyword arguments derived from the patched HF config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nemo_rl.rope.blocks import DYNAMIC_YARN, OVERRIDES_PATH, canonical_value
from nemo_rl.rope.hf_config import apply_hf_config_overrides, hf_rope_parameters
from nemo_rl.utils.errors import ConfigError


def vllm_engine_kwargs(
    hf_config: Any,
    overrides: Mapping[str, Any] | None,
    max_total_sequence_length: int,
    user_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``LLM(...)`` keyword arguments that make vLLM compute what the trainer computes.

    ``user_kwargs`` (a recipe's own vLLM arguments, ``policy.generation.vllm_kwargs``) are
    merged in; a key of their ``hf_overrides`` or a ``max_model_len`` that
    contradicts what the run derives is an error naming both values, never
    silently overwritten in either direction.

    ``hf_overrides`` are exactly the config entries that
    :func:`apply_hf_config_overrides` changes (so the two cannot drift), written
    whole: vLLM replaces a dict attribute rather than merging it, so a partial
    RoPE block would lose ``rope_theta``. vLLM caps ``max_model_len`` at a YaRN
    model's ``max_position_embeddings`` without multiplying by the factor, which
    is why the extended window travels in the overrides too.
    """
    patched_config = apply_hf_config_overrides(hf_config, overrides, max_total_sequence_length)
    if hf_rope_parameters(patched_config).get("rope_type") in ("dynamic", DYNAMIC_YARN):
        # vLLM builds one table for its max length instead of rescaling the base per sequence length.
        raise ValueError(
            f"{OVERRIDES_PATH}.rope_scaling.rope_type: vLLM computes dynamic scaling with a fixed base "
            "(its table length), transformers per sequence length; use rope_type=yarn or linear for generation"
        )
    patched = patched_config.to_dict()
    original = hf_config.to_dict()
    changed = {k: v for k, v in patched.items() if k != "transformers_version" and original.get(k) != v}
    derived = {"hf_overrides": changed, "max_model_len": max_total_sequence_length}
    return _merge_user_vllm_kwargs(derived, dict(user_kwargs or {}))


USER_VLLM_KWARGS_PATH = "policy.generation.vllm_kwargs"


def _merge_user_vllm_kwargs(derived: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
    user_path = USER_VLLM_KWARGS_PATH
    user_overrides = dict(user.pop("hf_overrides", None) or {})
    errors = [
        f"{user_path}.hf_overrides.{key}: {value!r} contradicts {derived['hf_overrides'][key]!r} derived from "
        f"{OVERRIDES_PATH} and policy.max_total_sequence_length; change it there (one place for trainer and "
        "generator) and drop it here"
        for key, value in user_overrides.items()
        if key in derived["hf_overrides"] and canonical_value(value) != canonical_value(derived["hf_overrides"][key])
    ]
    if "max_model_len" in user and user["max_model_len"] != derived["max_model_len"]:
        errors.append(
            f"{user_path}.max_model_len: {user['max_model_len']} contradicts policy.max_total_sequence_length = "
            f"{derived['max_model_len']}; the generator's window follows the policy's, drop it here"
        )
    if errors:
        raise ConfigError(errors)
    return user | derived | {"hf_overrides": user_overrides | derived["hf_overrides"]}
