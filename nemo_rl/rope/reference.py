"""The project's own statement of what a canonical RoPE block computes (float64 reference math).

transformers, megatron-core and vLLM each carry their own copy of this math (and
have disagreed before, see ``megatron_config.megatron_rope_fields``), so
tests/unit/test_rope_reference.py checks every engine against these functions
rather than against one another. Frequencies are computed in float64 so that the
reference is not itself a float32 rounding of the formula; the engines compute in
float32 and are compared within that rounding. The only module of the package
that imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from nemo_rl.rope.blocks import (
    DynamicNTKScaling,
    DynamicYarnScaling,
    LinearScaling,
    Llama3Scaling,
    RopeScaling,
    YarnScaling,
    parse_rope_scaling,
    rotary_dim,
    split_structural,
)
from nemo_rl.utils.errors import ConfigError


def _default_inv_freq(rope_theta: float, dim: int) -> torch.Tensor:
    """Plain RoPE: ``1 / theta^(2i/d)`` for i < d/2 (float64)."""
    return 1.0 / (rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


def dynamic_ntk_theta(
    rope_theta: float, factor: float, dim: int, original_max_position_embeddings: int, seq_len: int | None
) -> float:
    """The base that dynamic NTK uses for a sequence of ``seq_len`` tokens.

    Below the original window the base is unchanged; beyond it the base grows as
    ``theta * (s * L / L_orig - (s - 1))^(d/(d-2))``, transformers' rule for a
    given ``seq_len`` (``None`` means the original window, as at model init).
    """
    seq = original_max_position_embeddings if seq_len is None else max(seq_len, original_max_position_embeddings)
    return rope_theta * ((factor * seq / original_max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))


class YarnCorrectionRange(NamedTuple):
    """Rotary-pair indices where YaRN's ramp starts (``low``) and ends (``high``)."""

    low: float
    high: float


def yarn_correction_range(yarn: YarnScaling, dim: int) -> YarnCorrectionRange:
    """Where YaRN's ramp runs: pairs below ``low`` keep their frequency, pairs above ``high`` are interpolated.

    Pairs that turn more than ``beta_fast`` times in the original window are
    extrapolated, fewer than ``beta_slow`` times interpolated. Pair i turns
    ``L_orig / (2 pi theta^(2i/d))`` times, so the pair turning r times is
    ``d ln(L_orig / (2 pi r)) / (2 ln theta)``. ``truncate`` floors the low end and
    ceils the high end (Megatron: ``yarn_correction_range_round_to_int``); the range
    is then clamped to ``[0, d - 1]`` exactly as all three engines clamp it. Note
    ``d - 1``, not ``d/2 - 1`` (the last pair): when ``L_orig > 2 pi beta_slow theta``
    the ramp ends past the last pair, so the lowest frequencies are only partly
    interpolated; clamping at ``d/2 - 1`` instead would change them.
    """

    def pair_turning(rotations: float) -> float:
        return (
            dim
            * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi))
            / (2 * math.log(yarn.rope_theta))
        )

    low, high = pair_turning(yarn.beta_fast), pair_turning(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    return YarnCorrectionRange(max(low, 0), min(high, dim - 1))


def yarn_inv_freq(yarn: YarnScaling, dim: int) -> torch.Tensor:
    """YaRN's "NTK-by-parts" frequencies: a linear ramp over the correction range blends ``f`` into ``f / factor``."""
    low, high = yarn_correction_range(yarn, dim)
    if low == high:
        high += 0.001  # the engines' guard against a zero-width ramp
    interpolated = (torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)
    interpolated = interpolated.clamp(0, 1)
    extrapolation = _default_inv_freq(yarn.rope_theta, dim)
    return extrapolation / yarn.factor * interpolated + extrapolation * (1 - interpolated)


def rope_frequencies(
    params: Mapping[str, Any], head_dim: int, seq_len: int | None = None
) -> tuple[torch.Tensor, float]:
    """(inverse frequencies (float64, one per rotated pair), attention factor) of a canonical RoPE block.

    ``params`` is the block as this project writes it (``rope_type``,
    ``rope_theta``, ``factor``, ..., optionally ``partial_rotary_factor``),
    parsed by ``parse_rope_scaling``. The attention factor multiplies cos and
    sin. ``seq_len`` is the running length, which only the dynamic types read
    (``None``: the original window, as at model init). Static NTK-aware scaling
    is a ``default`` block, see ``NTKAwareScaling``.
    """
    dim = rotary_dim(head_dim, params.get("partial_rotary_factor", 1.0))
    try:
        scaling = parse_rope_scaling(split_structural(params)[0], path="rope_parameters")
    except ConfigError as error:
        raise ValueError(str(error)) from None
    if isinstance(scaling, DynamicYarnScaling):
        scaling = scaling.at_length(seq_len)
    return inv_freq(scaling, dim, seq_len), scaling.attention_factor


def inv_freq(scaling: RopeScaling, dim: int, seq_len: int | None = None) -> torch.Tensor:
    """The inverse frequencies (float64) of a parsed static block over ``dim`` rotated channels."""
    if isinstance(scaling, YarnScaling):  # DynamicYarnScaling is resolved with at_length() first
        return yarn_inv_freq(scaling, dim)
    if isinstance(scaling, DynamicNTKScaling):
        theta = dynamic_ntk_theta(
            scaling.rope_theta, scaling.factor, dim, scaling.original_max_position_embeddings, seq_len
        )
        return _default_inv_freq(theta, dim)
    if isinstance(scaling, Llama3Scaling):
        return llama3_inv_freq(scaling, dim)
    if isinstance(scaling, LinearScaling):
        return _default_inv_freq(scaling.rope_theta, dim) / scaling.factor
    return _default_inv_freq(scaling.rope_theta, dim)


def llama3_inv_freq(llama3: Llama3Scaling, dim: int) -> torch.Tensor:
    """Llama 3's remapping by wavelength ``2 pi / f`` against the original window ``L``: long waves
    (> ``L / low_freq_factor``) are slowed by ``factor``, short ones (< ``L / high_freq_factor``) kept, and in
    between ``f`` is blended with ``f / factor`` by ``(L / wavelength - low) / (high - low)``."""
    freq = _default_inv_freq(llama3.rope_theta, dim)
    wavelength = 2 * math.pi / freq
    original = llama3.original_max_position_embeddings
    smooth = (original / wavelength - llama3.low_freq_factor) / (llama3.high_freq_factor - llama3.low_freq_factor)
    blended = (1 - smooth) * freq / llama3.factor + smooth * freq
    slowed = torch.where(wavelength > original / llama3.low_freq_factor, freq / llama3.factor, blended)
    return torch.where(wavelength < original / llama3.high_freq_factor, freq, slowed)


def rope_cos_sin(inv_freq: torch.Tensor, attention_factor: float, positions: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (float64, ``[len(positions), len(inv_freq)]``) times the attention factor.

    One column per rotated pair; how an engine lays the pairs out (neox halves
    or interleaved) is its own business and not part of what the block means.
    """
    angles = torch.outer(torch.as_tensor(positions, dtype=torch.float64), inv_freq.to(torch.float64))
    return angles.cos() * attention_factor, angles.sin() * attention_factor
