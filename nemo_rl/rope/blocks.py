"""Typed RoPE blocks: the one parse of ``policy.hf_config_overrides.rope_scaling``.

One frozen dataclass per scaling method. A block is parsed into one of them once
(``parse_rope_scaling``, or ``RopeBlock.scaling`` for a block found in the
overrides) and every consumer reads typed fields, so no engine translation
re-parses or re-validates the raw dict. Every field is required: HF, Megatron and
vLLM each have different defaults for fields a recipe leaves out (transformers 5
and vLLM both fall back to rope_theta=10000 when a block written over a Qwen
config omits it), so an omitted field would silently give the trainer and the
generator different RoPE. Nothing here imports torch or an engine, so config
validation stays light.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Self

from nemo_rl.utils.errors import ConfigError, nearest_key

OVERRIDES_PATH = "policy.hf_config_overrides"
CANONICAL_BLOCK_KEY = "rope_scaling"
# Newer transformers call the block `rope_parameters`; both spellings mean the same thing.
BLOCK_KEYS = (CANONICAL_BLOCK_KEY, "rope_parameters")
YARN = "yarn"
# Mirrors transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS (plus "default"), hardcoded to keep
# transformers and torch out of config validation; a unit test checks that they agree.
KNOWN_ROPE_TYPES = ("default", "linear", "dynamic", YARN, "longrope", "llama3", "proportional")
# Keys of a RoPE block that describe the architecture rather than the scaling (Qwen2-VL's
# multimodal sections, partial rotary): kept as they are when a block is parsed or replaced.
STRUCTURAL_ROPE_KEYS = ("mrope_section", "mrope_interleaved", "partial_rotary_factor")
# Dynamic-YaRN (arXiv:2309.00071 sec. 3.3): YaRN with s = max(1, L / original) for the running length L.
# Only this project's reference math implements it; see `_dynamic_yarn_errors`.
DYNAMIC_YARN = "dynamic_yarn"


def factor_example(block_path: str) -> str:
    """The exact-fit factor as an interpolation, so it follows later edits of either length."""
    return f"${{div:${{policy.max_total_sequence_length}},${{{block_path}.original_max_position_embeddings}}}}"


class _TypedBlock:
    """What every parsed block offers: its canonical dict and parsing from one."""

    ROPE_TYPE: ClassVar[str]
    LABEL: ClassVar[str]  # the method's name in error messages

    def to_block(self) -> dict[str, Any]:
        """The canonical block (``rope_type`` plus every field) that HF, vLLM and the hash see."""
        return {"rope_type": self.ROPE_TYPE, **dataclasses.asdict(self)}  # pyright: ignore[reportArgumentType]  (subclasses are dataclasses)

    @classmethod
    def from_dict(cls, params: Mapping[str, Any], path: str = f"{OVERRIDES_PATH}.{CANONICAL_BLOCK_KEY}") -> Self:
        """Parse a raw block of this type; raises one ConfigError listing every problem in it."""
        parsed, errors = parse_fields(cls, params, path)
        if errors:
            raise ConfigError(errors)
        return parsed


@dataclass(frozen=True)
class PlainRope(_TypedBlock):
    """Unscaled RoPE (``rope_type: default``); also the canonical form of static NTK-aware scaling."""

    ROPE_TYPE: ClassVar[str] = "default"
    LABEL: ClassVar[str] = "default RoPE"

    rope_theta: float

    @property
    def attention_factor(self) -> float:
        return 1.0


@dataclass(frozen=True)
class LinearScaling(PlainRope):
    """Position interpolation (arXiv:2306.15595): every frequency divided by ``factor``."""

    ROPE_TYPE: ClassVar[str] = "linear"
    LABEL: ClassVar[str] = "linear"

    factor: float


@dataclass(frozen=True)
class DynamicNTKScaling(PlainRope):
    """Dynamic NTK: the base grows with the running length once it passes the original window.

    ``original_max_position_embeddings`` is the window transformers reads from
    ``config.max_position_embeddings`` (``apply_hf_config_overrides`` writes it
    there) and vLLM from ``max_trained_positions``.
    """

    ROPE_TYPE: ClassVar[str] = "dynamic"
    LABEL: ClassVar[str] = "dynamic NTK"

    factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class Llama3Scaling(PlainRope):
    """Llama 3.1/3.2's RoPE (``rope_type: llama3``): frequencies whose wavelength exceeds
    ``original / low_freq_factor`` are divided by ``factor``, those shorter than ``original / high_freq_factor``
    kept, and the band between blended smoothly. A base model ships it; runs keep it as it is."""

    ROPE_TYPE: ClassVar[str] = "llama3"
    LABEL: ClassVar[str] = "llama3"

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class NTKAwareScaling:
    """Static NTK-aware base scaling: plain RoPE with base ``theta * s^(d/(d-2))``.

    transformers has no rope_type for it (its ``dynamic`` type recomputes the
    base from the sequence length) and vLLM's ``rope_type: ntk`` is a different
    formula (base * s, then every frequency / s^(2/d), so even the fastest pair
    is slowed). The only spelling every engine reads the same way is therefore a
    ``default`` block whose base is already scaled: ``to_block`` writes that, and
    a parsed block comes back as ``PlainRope``. ``rotary_dim`` is the number of
    rotated channels (see ``rotary_dim``), on which the exponent depends.
    """

    rope_theta: float
    factor: float
    rotary_dim: int

    def __post_init__(self) -> None:
        if not self.factor > 0:
            raise ValueError(f"factor must be > 0, got {self.factor}")
        if not self.rotary_dim > 2:
            raise ValueError(f"rotary_dim must be > 2, got {self.rotary_dim}")

    def to_plain(self) -> PlainRope:
        return PlainRope(self.rope_theta * self.factor ** (self.rotary_dim / (self.rotary_dim - 2)))

    def to_block(self) -> dict[str, Any]:
        return self.to_plain().to_block()


@dataclass(frozen=True)
class YarnScaling(_TypedBlock):
    """YaRN (arXiv:2309.00071): NTK-by-parts frequencies plus an attention temperature."""

    ROPE_TYPE: ClassVar[str] = YARN
    LABEL: ClassVar[str] = "YaRN"

    rope_theta: float
    factor: float
    original_max_position_embeddings: int
    truncate: bool
    beta_fast: float
    beta_slow: float
    mscale: float
    mscale_all_dim: float

    @property
    def attention_factor(self) -> float:
        """The cos/sin (attention temperature) multiplier, with the HF/vLLM meaning of the mscale pair.

        transformers and vLLM use ``mscale(s, mscale) / mscale(s, mscale_all_dim)``
        only when both are non-zero, else ``mscale(s)``; that is the meaning this
        project adopts (megatron-core reads the pair differently, see
        ``megatron_rope_fields``).
        """
        if self.mscale and self.mscale_all_dim:
            return _yarn_mscale(self.factor, self.mscale) / _yarn_mscale(self.factor, self.mscale_all_dim)
        return _yarn_mscale(self.factor)


@dataclass(frozen=True)
class DynamicYarnScaling(YarnScaling):
    """Dynamic-YaRN (arXiv:2309.00071 sec. 3.3): YaRN with ``s = min(factor, L / original)`` for running length L.

    Plain RoPE inside the original window. Only this project's reference math
    implements it; runs refuse it (see ``_dynamic_yarn_errors``).
    """

    ROPE_TYPE: ClassVar[str] = DYNAMIC_YARN
    LABEL: ClassVar[str] = "Dynamic-YaRN"

    def at_length(self, seq_len: int | None) -> YarnScaling | PlainRope:
        """The static scaling in force for a sequence of ``seq_len`` tokens."""
        if seq_len is None:
            raise ValueError(f"rope_type={DYNAMIC_YARN} needs the running sequence length (seq_len)")
        scale = seq_len / self.original_max_position_embeddings
        if scale <= 1:
            return PlainRope(self.rope_theta)
        return dataclasses.replace(YarnScaling(**dataclasses.asdict(self)), factor=min(scale, self.factor))

    @property
    def attention_factor(self) -> float:
        raise ValueError(f"rope_type={DYNAMIC_YARN}: the attention factor depends on the length, use at_length()")


RopeScaling = PlainRope | LinearScaling | DynamicNTKScaling | Llama3Scaling | YarnScaling | DynamicYarnScaling
# The types a block can be parsed into, by rope_type (NTK-aware scaling is written as `default`).
ROPE_SCALING_TYPES: dict[str, type] = {
    cls.ROPE_TYPE: cls
    for cls in (PlainRope, LinearScaling, DynamicNTKScaling, Llama3Scaling, YarnScaling, DynamicYarnScaling)
}
_EXAMPLES = {
    "rope_theta": "1000000 (the model's rope_theta, see its config.json)",
    "original_max_position_embeddings": "40960 (the model's pretraining context: max_position_embeddings in its config.json)",
    "truncate": "true",
    "beta_fast": "32",
    "beta_slow": "1",
    "mscale": "1",
    "mscale_all_dim": "0",
    "low_freq_factor": "1.0 (Llama 3.1/3.2)",
    "high_freq_factor": "4.0 (Llama 3.1/3.2)",
}


def parse_rope_scaling(params: Mapping[str, Any], path: str = f"{OVERRIDES_PATH}.{CANONICAL_BLOCK_KEY}") -> RopeScaling:
    """The typed form of a RoPE block (``type`` read as ``rope_type``); one ConfigError lists every problem."""
    params, errors = _normalise_type_alias(params, path)
    rope_type = params.get("rope_type", "default")
    cls = ROPE_SCALING_TYPES.get(rope_type)
    if cls is None:
        match = nearest_key(str(rope_type), tuple(ROPE_SCALING_TYPES))
        hint = f"did you mean {match}?" if match else f"this project defines: {', '.join(ROPE_SCALING_TYPES)}"
        raise ConfigError(errors + [f"{path}.rope_type: no typed form for {rope_type!r} ({hint})"])
    parsed, field_errors = parse_fields(cls, params, path)
    if errors or field_errors:
        raise ConfigError(errors + field_errors)
    return parsed


# ----------------------------------------------------------------------------
# Finding the block under either spelling
# ----------------------------------------------------------------------------
@dataclass(frozen=True)
class RopeBlock:
    """The RoPE block with `type` renamed to `rope_type`, remembering how the recipe spelled it.

    The spelling is kept only so error messages point at the key the user wrote.
    """

    key: str
    params: dict[str, Any]

    @property
    def path(self) -> str:
        return f"{OVERRIDES_PATH}.{self.key}"

    @property
    def rope_type(self) -> Any:
        return self.params.get("rope_type")

    @functools.cached_property
    def scaling(self) -> RopeScaling | None:
        """The typed form, parsed once (None for types without one, e.g. llama3); raises ConfigError if invalid."""
        if self.rope_type not in ROPE_SCALING_TYPES:
            return None
        return parse_rope_scaling(split_structural(self.params)[0], self.path)


def rope_block(overrides: Mapping[str, Any] | None) -> tuple[RopeBlock | None, list[str]]:
    """The block if there is exactly one meaning of it, else the spelling conflicts found."""
    blocks: list[RopeBlock] = []
    errors: list[str] = []
    for key in BLOCK_KEYS:
        raw = (overrides or {}).get(key)
        if raw is None:
            continue
        if not isinstance(raw, Mapping):
            errors.append(f"{OVERRIDES_PATH}.{key}: must be a mapping, got {raw!r}")
            continue
        params, alias_errors = _normalise_type_alias(raw, f"{OVERRIDES_PATH}.{key}")
        errors += alias_errors
        blocks.append(RopeBlock(key, params))
    if len(blocks) == 2 and canonical_value(blocks[0].params) != canonical_value(blocks[1].params):
        errors.append(
            f"{OVERRIDES_PATH}: both rope_scaling and rope_parameters are set and differ; they are two names "
            "(older and newer transformers) for the same block, keep one"
        )
    if errors:
        return None, errors
    return (blocks[0] if blocks else None), []


def checked_rope_block(overrides: Mapping[str, Any] | None) -> RopeBlock | None:
    """The block, or None when there is none; a spelling conflict raises (validation has reported it already)."""
    block, errors = rope_block(overrides)
    if errors:
        raise ConfigError(errors)
    return block


def _normalise_type_alias(raw: Mapping[str, Any], path: str) -> tuple[dict[str, Any], list[str]]:
    """Older HF configs say `type`; fold it into `rope_type` so every consumer sees one key."""
    params = dict(raw)
    if "type" not in params:
        return params, []
    alias = params.pop("type")
    if "rope_type" in params and params["rope_type"] != alias:
        return params, [
            f"{path}: `type` ({alias!r}) and `rope_type` ({params['rope_type']!r}) disagree; keep rope_type"
        ]
    params["rope_type"] = alias
    return params, []


# ----------------------------------------------------------------------------
# Parsing fields into the typed blocks
# ----------------------------------------------------------------------------
class _RangeRule(NamedTuple):
    field: str
    needs: tuple[str, ...]
    holds: Callable[[Mapping[str, Any]], bool]
    message: str  # formatted with the block's values


_POSITIVE_THETA = _RangeRule(
    "rope_theta", ("rope_theta",), lambda v: v["rope_theta"] > 0, "must be > 0, got {rope_theta}"
)
_POSITIVE_FACTOR = _RangeRule("factor", ("factor",), lambda v: v["factor"] > 0, "must be > 0, got {factor}")
_POSITIVE_ORIGINAL = _RangeRule(
    "original_max_position_embeddings",
    ("original_max_position_embeddings",),
    lambda v: v["original_max_position_embeddings"] > 0,
    "must be > 0, got {original_max_position_embeddings}",
)
_YARN_RANGES = (
    _POSITIVE_THETA,
    _RangeRule(
        "factor",
        ("factor",),
        lambda v: v["factor"] > 1,
        "must be > 1, got {factor}; a factor <= 1 extends nothing (if max_total_sequence_length fits in "
        "original_max_position_embeddings, drop the block)",
    ),
    _POSITIVE_ORIGINAL,
    _RangeRule("beta_slow", ("beta_slow",), lambda v: v["beta_slow"] > 0, "must be > 0, got {beta_slow}"),
    _RangeRule(
        "beta_fast",
        ("beta_fast", "beta_slow"),
        lambda v: v["beta_fast"] > v["beta_slow"],
        "must be > beta_slow ({beta_slow}), got {beta_fast}",
    ),
    _RangeRule("mscale", ("mscale",), lambda v: v["mscale"] >= 0, "must be >= 0, got {mscale}"),
    _RangeRule(
        "mscale_all_dim", ("mscale_all_dim",), lambda v: v["mscale_all_dim"] >= 0, "must be >= 0, got {mscale_all_dim}"
    ),
)
# A linear or dynamic factor below 1 compresses positions; unusual but well defined, so only > 0 is required.
_RANGES: dict[type, tuple[_RangeRule, ...]] = {
    PlainRope: (_POSITIVE_THETA,),
    LinearScaling: (_POSITIVE_THETA, _POSITIVE_FACTOR),
    DynamicNTKScaling: (_POSITIVE_THETA, _POSITIVE_FACTOR, _POSITIVE_ORIGINAL),
    Llama3Scaling: (
        _POSITIVE_THETA,
        _POSITIVE_FACTOR,
        _POSITIVE_ORIGINAL,
        _RangeRule(
            "low_freq_factor",
            ("low_freq_factor",),
            lambda v: v["low_freq_factor"] > 0,
            "must be > 0, got {low_freq_factor}",
        ),
        _RangeRule(
            "high_freq_factor",
            ("low_freq_factor", "high_freq_factor"),
            lambda v: v["high_freq_factor"] > v["low_freq_factor"],
            "must be > low_freq_factor ({low_freq_factor}), got {high_freq_factor}",
        ),
    ),
    YarnScaling: _YARN_RANGES,
    DynamicYarnScaling: _YARN_RANGES,
}


@functools.cache
def _field_types(cls: type) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def parse_fields(cls: type, params: Mapping[str, Any], path: str, extends: bool = True) -> tuple[Any, list[str]]:
    """(typed block or None, every problem found). ``extends=False`` skips YaRN's ``factor > 1``.

    The YaRN factor rule is skipped when the block will not be applied (see
    ``effective_overrides``): a shortened test run must not fail on it.
    """
    types = _field_types(cls)
    ranges = tuple(rule for rule in _RANGES[cls] if extends or rule.field != "factor")
    errors = _unknown_key_errors(cls, params, path) + _rope_type_errors(cls, params, path)
    present = {name: params[name] for name in types if params.get(name) is not None}
    errors += [
        f"{path}.{name}: required for rope_type={cls.ROPE_TYPE} (e.g. {name}: {_example(cls, name, path)})"
        for name in types
        if name not in present
    ]
    typed = {}
    for name, value in present.items():
        problem = _type_problem(value, types[name])
        if problem:
            errors.append(f"{path}.{name}: must be {problem}, got {value!r}")
        else:
            typed[name] = types[name](value)
    errors += [
        f"{path}.{rule.field}: {rule.message.format(**typed)}"
        for rule in ranges
        if all(name in typed for name in rule.needs) and not rule.holds(typed)
    ]
    if errors:
        return None, errors
    return cls(**typed), []


def _example(cls: type, name: str, path: str) -> str:
    if name == "factor":
        return factor_example(path) if issubclass(cls, YarnScaling) else "2.0"
    return _EXAMPLES[name]


def _unknown_key_errors(cls: type, params: Mapping[str, Any], path: str) -> list[str]:
    """Fields outside the type's set would reach some engines and not others, so they are refused."""
    valid = ("rope_type", *_field_types(cls))
    errors = []
    for key in params:
        if key not in valid and key != "type":
            match = nearest_key(str(key), valid)
            hint = f"did you mean {match}?" if match else f"valid keys: {', '.join(valid)}"
            errors.append(f"{path}.{key}: unknown {cls.LABEL} field ({hint})")
    return errors


def _rope_type_errors(cls: type, params: Mapping[str, Any], path: str) -> list[str]:
    rope_type = params.get("rope_type", params.get("type", cls.ROPE_TYPE))
    return [] if rope_type == cls.ROPE_TYPE else [f"{path}.rope_type: expected {cls.ROPE_TYPE!r}, got {rope_type!r}"]


def _type_problem(value: Any, expected: type) -> str | None:
    """What `value` should have been, or None. Bools are refused as numbers: `factor: true` is a typo."""
    if expected is bool:
        return None if isinstance(value, bool) else "true or false"
    if isinstance(value, bool):
        return "an integer" if expected is int else "a number"
    if expected is int:
        return None if isinstance(value, int) else "an integer"
    return None if isinstance(value, (int, float)) and math.isfinite(value) else "a finite number"


def canonical_value(value: Any) -> Any:
    """A raw value in the form the canonical JSON writes (integral floats as ints: YAML `2` and `2.0` agree)."""
    if isinstance(value, Mapping):
        return {str(k): canonical_value(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [canonical_value(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{OVERRIDES_PATH}: {value!r} ({type(value).__name__}) has no JSON form")


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature term (paper eq. 22 generalised by DeepSeek's mscale)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def split_structural(params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(scaling fields, architecture fields) of a RoPE block; see ``STRUCTURAL_ROPE_KEYS``."""
    scaling = {k: v for k, v in params.items() if k not in STRUCTURAL_ROPE_KEYS}
    return scaling, {k: v for k, v in params.items() if k in STRUCTURAL_ROPE_KEYS}


def rotary_dim(head_dim: int, partial_rotary_factor: float = 1.0) -> int:
    """Channels that are rotated: ``int(head_dim * partial_rotary_factor)``, as transformers and vLLM round it."""
    if not 0.0 < partial_rotary_factor <= 1.0:
        raise ValueError(f"partial_rotary_factor must be in (0, 1], got {partial_rotary_factor}")
    return int(head_dim * partial_rotary_factor)
