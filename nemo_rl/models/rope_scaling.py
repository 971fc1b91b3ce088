"""The one place that decides what ``policy.hf_config_overrides`` means.

The same override block changes the HF config, the Megatron model, the vLLM
engine and the name of the converted-checkpoint cache. If each of those read
the raw dict on its own, two spellings of one setting (``rope_scaling`` vs the
newer transformers ``rope_parameters``, ``type`` vs ``rope_type``) or a float
written as ``2`` in one recipe and ``2.0`` in another could make the trainer and
the generator disagree, or make one model occupy two cache entries. So this
module normalises the block once, validates it before anything starts, and owns
its canonical hash. Translations to each backend belong here too.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Self

from nemo_rl.utils.config import ConfigError, nearest_key

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
# What megatron-core 0.16's GPTModel can build: plain and linear RoPE (GPTModel arguments) and YarnRotaryEmbedding.
MEGATRON_ROPE_TYPES = ("default", "linear", YARN)
# Dynamic-YaRN (arXiv:2309.00071 sec. 3.3): YaRN with s = max(1, L / original) for the running length L.
# Only this project's reference math implements it; see `_dynamic_yarn_errors`.
DYNAMIC_YARN = "dynamic_yarn"


def _factor_example(block_path: str) -> str:
    """The exact-fit factor as an interpolation, so it follows later edits of either length."""
    return f"${{div:${{policy.max_total_sequence_length}},${{{block_path}.original_max_position_embeddings}}}}"


# ----------------------------------------------------------------------------
# Typed RoPE blocks
# ----------------------------------------------------------------------------
# One frozen dataclass per scaling method. A block is parsed into one of them once
# (``parse_rope_scaling``) and every consumer reads typed fields, so no engine
# translation re-parses or re-validates the raw dict. Every field is required:
# HF, Megatron and vLLM each have different defaults for fields a recipe leaves
# out (transformers 5 and vLLM both fall back to rope_theta=10000 when a block
# written over a Qwen config omits it), so an omitted field would silently give
# the trainer and the generator different RoPE.
class _TypedBlock:
    """What every parsed block offers: its canonical dict and parsing from one."""

    ROPE_TYPE: ClassVar[str]
    LABEL: ClassVar[str]  # the method's name in error messages

    def to_block(self) -> dict[str, Any]:
        """The canonical block (``rope_type`` plus every field) that HF, vLLM and the hash see."""
        return {"rope_type": self.ROPE_TYPE, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, params: Mapping[str, Any], path: str = f"{OVERRIDES_PATH}.{CANONICAL_BLOCK_KEY}") -> Self:
        """Parse a raw block of this type; raises one ConfigError listing every problem in it."""
        parsed, errors = _parse_fields(cls, params, path)
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

    def inv_freq(self, dim: int, seq_len: int | None = None) -> Any:
        return _default_inv_freq(self.rope_theta, dim)


@dataclass(frozen=True)
class LinearScaling(PlainRope):
    """Position interpolation (arXiv:2306.15595): every frequency divided by ``factor``."""

    ROPE_TYPE: ClassVar[str] = "linear"
    LABEL: ClassVar[str] = "linear"

    factor: float

    def inv_freq(self, dim: int, seq_len: int | None = None) -> Any:
        return _default_inv_freq(self.rope_theta, dim) / self.factor


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

    def inv_freq(self, dim: int, seq_len: int | None = None) -> Any:
        theta = dynamic_ntk_theta(self.rope_theta, self.factor, dim, self.original_max_position_embeddings, seq_len)
        return _default_inv_freq(theta, dim)


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

    def inv_freq(self, dim: int, seq_len: int | None = None) -> Any:
        return yarn_inv_freq(self, dim)


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
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return YarnScaling(**(fields | {"factor": min(scale, self.factor)}))

    @property
    def attention_factor(self) -> float:
        raise ValueError(f"rope_type={DYNAMIC_YARN}: the attention factor depends on the length, use at_length()")


RopeScaling = PlainRope | LinearScaling | DynamicNTKScaling | YarnScaling | DynamicYarnScaling
# The types a block can be parsed into, by rope_type (NTK-aware scaling is written as `default`).
ROPE_SCALING_TYPES: dict[str, type] = {
    cls.ROPE_TYPE: cls for cls in (PlainRope, LinearScaling, DynamicNTKScaling, YarnScaling, DynamicYarnScaling)
}
_EXAMPLES = {
    "rope_theta": "1000000 (the model's rope_theta, see its config.json)",
    "original_max_position_embeddings": "40960 (the model's pretraining context: max_position_embeddings in its config.json)",
    "truncate": "true",
    "beta_fast": "32",
    "beta_slow": "1",
    "mscale": "1",
    "mscale_all_dim": "0",
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
    parsed, field_errors = _parse_fields(cls, params, path)
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


def _rope_block(overrides: Mapping[str, Any] | None) -> tuple[RopeBlock | None, list[str]]:
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
    if len(blocks) == 2 and _canonical(blocks[0].params) != _canonical(blocks[1].params):
        errors.append(
            f"{OVERRIDES_PATH}: both rope_scaling and rope_parameters are set and differ; they are two names "
            "(older and newer transformers) for the same block, keep one"
        )
    if errors:
        return None, errors
    return (blocks[0] if blocks else None), []


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
    YarnScaling: _YARN_RANGES,
    DynamicYarnScaling: _YARN_RANGES,
}


@functools.cache
def _field_types(cls: type) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _parse_fields(cls: type, params: Mapping[str, Any], path: str, extends: bool = True) -> tuple[Any, list[str]]:
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
        return _factor_example(path) if issubclass(cls, YarnScaling) else "2.0"
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


# ----------------------------------------------------------------------------
# Run-level rules
# ----------------------------------------------------------------------------
def yarn_scaling(overrides: Mapping[str, Any] | None) -> YarnScaling | None:
    """The YaRN scaling the overrides request, or None when they request none."""
    block, errors = _rope_block(overrides)
    if errors:
        raise ConfigError(errors)
    if block is None or block.rope_type != YARN:
        return None
    return YarnScaling.from_dict(block.params, block.path)


def requests_yarn(overrides: Mapping[str, Any] | None) -> bool:
    block, errors = _rope_block(overrides)
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
    block, errors = _rope_block(overrides)
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
    yarn, field_errors = _parse_fields(YarnScaling, block.params, block.path, extends)
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
        f"such rope type); use rope_type: {YARN} with factor: {_factor_example(block.path)}"
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
    return [] if cls is None else _parse_fields(cls, block.params, block.path)[1]


def megatron_rope_type_errors(overrides: Mapping[str, Any] | None) -> list[str]:
    """Run-time refusal, at config time, of RoPE types megatron-core cannot build (see ``megatron_rope_fields``)."""
    block, errors = _rope_block(overrides)
    if errors or block is None or block.rope_type in MEGATRON_ROPE_TYPES or block.rope_type == DYNAMIC_YARN:
        return []  # spelling errors and Dynamic-YaRN are reported by validate_long_context
    return [_megatron_type_error(block.rope_type, block.path)]


def _megatron_type_error(rope_type: Any, path: str) -> str:
    return (
        f"{path}.rope_type: {rope_type!r} cannot be built by megatron-core 0.16 (it builds one fixed RoPE table: "
        f"rope_type {', '.join(MEGATRON_ROPE_TYPES)}); the trainer would compute different RoPE from HF and vLLM. "
        f"Use rope_type: {YARN} (or linear)"
    )


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
        f"(e.g. factor: {_factor_example(block.path)})"
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
    block, errors = _rope_block(overrides)
    if errors:
        raise ConfigError(errors)
    if block is None or block.rope_type != YARN or _extends(block.params, max_total_sequence_length):
        return dict(overrides)
    rest = {k: v for k, v in overrides.items() if k not in BLOCK_KEYS}
    return rest or None


# ----------------------------------------------------------------------------
# Canonical form and hash
# ----------------------------------------------------------------------------
def canonical_overrides_json(overrides: Mapping[str, Any] | None) -> str:
    """The overrides as JSON that is equal exactly when the overrides mean the same thing.

    Sorted keys, no whitespace, integral floats written as ints (YAML `2` and
    `2.0` are one setting), the block always under `rope_scaling` with
    `rope_type`. None and {} both give "{}".
    """
    block, errors = _rope_block(overrides)
    if errors:
        raise ConfigError(errors)
    normalised = {k: v for k, v in (overrides or {}).items() if k not in BLOCK_KEYS}
    if block is not None:
        normalised[CANONICAL_BLOCK_KEY] = block.params
    return json.dumps(_canonical(normalised), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def overrides_hash(overrides: Mapping[str, Any] | None) -> str:
    """12 hex digits naming an override set, e.g. in converted-checkpoint directory names.

    No overrides (None or {}) hash as "{}": 44136fa355b3.
    """
    return hashlib.sha256(canonical_overrides_json(overrides).encode("ascii")).hexdigest()[:12]


def _canonical(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_canonical(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{OVERRIDES_PATH}: {value!r} ({type(value).__name__}) has no JSON form")


# ----------------------------------------------------------------------------
# Translations into each engine's terms
# ----------------------------------------------------------------------------
def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature term (paper eq. 22 generalised by DeepSeek's mscale)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


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
    block, _ = _rope_block(effective)
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
    if block.rope_type not in ROPE_SCALING_TYPES:
        return dict(block.params)
    scaling, structural = split_structural(block.params)
    return parse_rope_scaling(scaling, block.path).to_block() | structural


def split_structural(params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(scaling fields, architecture fields) of a RoPE block; see ``STRUCTURAL_ROPE_KEYS``."""
    scaling = {k: v for k, v in params.items() if k not in STRUCTURAL_ROPE_KEYS}
    return scaling, {k: v for k, v in params.items() if k in STRUCTURAL_ROPE_KEYS}


def _hf_max_position_embeddings(block: RopeBlock, max_total_sequence_length: int, data: Mapping[str, Any]) -> int:
    """What ``max_position_embeddings`` must say for HF to compute the block's RoPE.

    YaRN: the extended window (as YaRN checkpoints such as DeepSeek-V3 ship it).
    Dynamic NTK: transformers reads the original window from this field, so it
    must be the block's ``original_max_position_embeddings``.
    """
    if block.rope_type == YARN:
        yarn = YarnScaling.from_dict(block.params, block.path)
        return max(math.ceil(yarn.factor * yarn.original_max_position_embeddings), max_total_sequence_length)
    if block.rope_type == DynamicNTKScaling.ROPE_TYPE:
        return DynamicNTKScaling.from_dict(block.params, block.path).original_max_position_embeddings
    return data["max_position_embeddings"]


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
        if key in derived["hf_overrides"] and _canonical(value) != _canonical(derived["hf_overrides"][key])
    ]
    if "max_model_len" in user and user["max_model_len"] != derived["max_model_len"]:
        errors.append(
            f"{user_path}.max_model_len: {user['max_model_len']} contradicts policy.max_total_sequence_length = "
            f"{derived['max_model_len']}; the generator's window follows the policy's, drop it here"
        )
    if errors:
        raise ConfigError(errors)
    return user | derived | {"hf_overrides": user_overrides | derived["hf_overrides"]}


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
    if rope_type != YARN:
        return {}  # plain and linear RoPE are GPTModel arguments, see megatron_gpt_rope_kwargs
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
    (positions divided by the factor, i.e. ``inv_freq / factor``).
    """
    params = hf_rope_parameters(hf_config)
    fields = megatron_rope_fields(hf_config)  # validates the block for Megatron
    return {
        "position_embedding_type": "yarn" if fields else "rope",
        "rotary_base": rope_theta_of(hf_config),
        "rotary_percent": params.get("partial_rotary_factor", 1.0),
        "seq_len_interpolation_factor": params["factor"] if params.get("rope_type") == "linear" else None,
    }


# ----------------------------------------------------------------------------
# RoPE math
# ----------------------------------------------------------------------------
# The project's own statement of what a canonical RoPE block computes. transformers,
# megatron-core and vLLM each carry their own copy of this math (and have disagreed
# before, see ``megatron_rope_fields``), so tests/unit/test_rope_reference.py checks
# every engine against these functions rather than against one another. Frequencies
# are computed in float64 so that the reference is not itself a float32 rounding of
# the formula; the engines compute in float32 and are compared within that rounding.
# torch is imported inside the functions to keep it out of config validation.


def rotary_dim(head_dim: int, partial_rotary_factor: float = 1.0) -> int:
    """Channels that are rotated: ``int(head_dim * partial_rotary_factor)``, as transformers and vLLM round it."""
    if not 0.0 < partial_rotary_factor <= 1.0:
        raise ValueError(f"partial_rotary_factor must be in (0, 1], got {partial_rotary_factor}")
    return int(head_dim * partial_rotary_factor)


def _default_inv_freq(rope_theta: float, dim: int) -> Any:
    """Plain RoPE: ``1 / theta^(2i/d)`` for i < d/2 (float64)."""
    import torch

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


def yarn_inv_freq(yarn: YarnScaling, dim: int) -> Any:
    """YaRN's "NTK-by-parts" frequencies: a linear ramp over the correction range blends ``f`` into ``f / factor``."""
    import torch

    low, high = yarn_correction_range(yarn, dim)
    if low == high:
        high += 0.001  # the engines' guard against a zero-width ramp
    interpolated = (torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)
    interpolated = interpolated.clamp(0, 1)
    extrapolation = _default_inv_freq(yarn.rope_theta, dim)
    return extrapolation / yarn.factor * interpolated + extrapolation * (1 - interpolated)


def rope_frequencies(params: Mapping[str, Any], head_dim: int, seq_len: int | None = None) -> tuple[Any, float]:
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
    return scaling.inv_freq(dim, seq_len), scaling.attention_factor


def rope_cos_sin(inv_freq: Any, attention_factor: float, positions: Any) -> tuple[Any, Any]:
    """cos and sin (float64, ``[len(positions), len(inv_freq)]``) times the attention factor.

    One column per rotated pair; how an engine lays the pairs out (neox halves
    or interleaved) is its own business and not part of what the block means.
    """
    import torch

    angles = torch.outer(torch.as_tensor(positions, dtype=torch.float64), inv_freq.to(torch.float64))
    return angles.cos() * attention_factor, angles.sin() * attention_factor
