"""Run-level rules for the RoPE block: what a run may ask of it, checked before anything starts.

Errors are returned as lists (not raised) where the config validator merges them
with every other problem into one report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from nemo_rl.rope.blocks import (
    BLOCK_KEYS,
    DYNAMIC_YARN,
    KNOWN_ROPE_TYPES,
    ROPE_SCALING_TYPES,
    YARN,
    RopeBlock,
    YarnScaling,
    checked_rope_block,
    factor_example,
    parse_fields,
    rope_block,
)
from nemo_rl.utils.errors import nearest_key


def yarn_scaling(overrides: Mapping[str, Any] | None) -> YarnScaling | None:
    """The YaRN scaling the overrides request, or None when they request none."""
    block = checked_rope_block(overrides)
    if block is None or block.rope_type != YARN:
        return None
    assert isinstance(block.scaling, YarnScaling)  # rope_type yarn parses to YarnScaling
    return block.scaling


def requests_yarn(overrides: Mapping[str, Any] | None) -> bool:
    block, errors = rope_block(overrides)
    return not errors and block is not None and block.rope_type == YARN


def validate_long_context(
    overrides: Mapping[str, Any] | None,
    max_total_sequence_length: int,
    megatron_enabled: bool,
    dtensor_enabled: bool,
) -> tuple[YarnScaling | None, list[str], list[str]]:
    """Check the RoPE block against the run: (YaRN scaling if valid, errors, notes).

    Errors are returned rather than raised so the caller can merge them with
    every other config problem into one report.
    """
    block, errors = rope_block(overrides)
    if block is None or errors:
        return None, errors, []
    if block.rope_type == DYNAMIC_YARN:
        return None, _dynamic_yarn_errors(block), []
    errors = _rope_type_value_errors(block)
    if errors:
        return None, errors, []
    if block.rope_type != YARN:
        return None, _typed_errors(block), []
    errors = _backend_errors(block, megatron_enabled, dtensor_enabled)
    extends = _extends(block.params, max_total_sequence_length)
    yarn, field_errors = parse_fields(YarnScaling, block.params, block.path, extends)
    if yarn is None:
        return None, errors + field_errors, []
    if not extends:
        return None, errors, _no_extension_notes(yarn, block, max_total_sequence_length)
    errors += _coverage_errors(yarn, block, max_total_sequence_length)
    if errors:
        return None, errors, []
    return yarn, [], []


def _dynamic_yarn_errors(block: RopeBlock) -> list[str]:
    """No installed engine rescales YaRN per sequence length, so trainer and generator cannot agree on it."""
    return [
        f"{block.path}.rope_type: {DYNAMIC_YARN} (YaRN rescaled to each running length) is implemented by none of "
        "the engines a run uses (megatron-core 0.16 and vLLM 0.32 build one fixed RoPE table; transformers 5 has no "
        f"such rope type); use rope_type: {YARN} with factor: {factor_example(block.path)}"
    ]


def _rope_type_value_errors(block: RopeBlock) -> list[str]:
    """A misspelt rope_type would silently skip every YaRN check, so unknown values are refused."""
    if block.rope_type is None:
        return [f"{block.path}.rope_type: required (e.g. rope_type: {YARN})"]
    if block.rope_type in KNOWN_ROPE_TYPES:
        return []
    match = nearest_key(str(block.rope_type), KNOWN_ROPE_TYPES)
    hint = f"did you mean {match}?" if match else f"known: {', '.join(KNOWN_ROPE_TYPES)}"
    return [f"{block.path}.rope_type: unknown RoPE type {block.rope_type!r} ({hint})"]


def _typed_errors(block: RopeBlock) -> list[str]:
    """Every field of a block with a typed form is checked; types without one (llama3, longrope) pass as is."""
    cls = ROPE_SCALING_TYPES.get(block.rope_type)
    return [] if cls is None else parse_fields(cls, block.params, block.path)[1]


def _backend_errors(block: RopeBlock, megatron_enabled: bool, dtensor_enabled: bool) -> list[str]:
    """Only the Megatron path implements YaRN; the DTensor path would train with unscaled RoPE."""
    if megatron_enabled and not dtensor_enabled:
        return []
    return [
        f"{block.path}.rope_type: YaRN is only supported on the Megatron backend "
        f"(now policy.megatron_cfg.enabled={str(megatron_enabled).lower()}, "
        f"policy.dtensor_cfg.enabled={str(dtensor_enabled).lower()}); "
        "set policy.megatron_cfg.enabled=true and policy.dtensor_cfg.enabled=false"
    ]


def _coverage_errors(yarn: YarnScaling, block: RopeBlock, max_total_sequence_length: int) -> list[str]:
    """Positions past factor * original window are extrapolated, which is what YaRN is meant to avoid."""
    covered = yarn.factor * yarn.original_max_position_embeddings
    if covered >= max_total_sequence_length or math.isclose(covered, max_total_sequence_length):
        return []
    needed = max_total_sequence_length / yarn.original_max_position_embeddings
    return [
        f"{block.path}.factor: factor * original_max_position_embeddings = {yarn.factor} * "
        f"{yarn.original_max_position_embeddings} = {covered:g} does not cover "
        f"policy.max_total_sequence_length = {max_total_sequence_length}; use factor >= {needed} "
        f"(e.g. factor: {factor_example(block.path)})"
    ]


def _extends(params: Mapping[str, Any], max_total_sequence_length: int) -> bool:
    """YaRN acts only when sequences outgrow the pretraining window (the NeMo RL guide's rule)."""
    original = params.get("original_max_position_embeddings")
    if not isinstance(original, int) or isinstance(original, bool):
        return True  # let field validation report it
    return max_total_sequence_length > original


def _no_extension_notes(yarn: YarnScaling, block: RopeBlock, max_total_sequence_length: int) -> list[str]:
    """Not an error (a recipe may shorten sequences for a quick test), but worth saying out loud."""
    return [
        f"{block.path}: YaRN is a no-op here: policy.max_total_sequence_length = {max_total_sequence_length} "
        f"<= original_max_position_embeddings = {yarn.original_max_position_embeddings}, so the block is not "
        "applied and the model keeps its pretraining RoPE (trainer, generator and cache alike)."
    ]


def effective_overrides(overrides: Mapping[str, Any] | None, max_total_sequence_length: int) -> dict[str, Any] | None:
    """The overrides the engines actually receive: a YaRN block that extends nothing is dropped.

    Everything downstream (HF config, Megatron, vLLM, the cache hash) takes this,
    so a no-op block cannot make one engine rescale RoPE while another does not.
    """
    if not overrides:
        return None
    block = checked_rope_block(overrides)
    if block is None or block.rope_type != YARN or _extends(block.params, max_total_sequence_length):
        return dict(overrides)
    rest = {k: v for k, v in overrides.items() if k not in BLOCK_KEYS}
    return rest or None
