"""Context extension of an in-memory HF model with one knob: ``apply_rope_scaling(model, cfg)``.

Three published RoPE remappings are offered (seed 002):

- ``yarn`` (arXiv:2309.00071): NTK-by-parts frequencies plus the attention
  temperature; the production default, stable at 4-32x.
- ``linear`` position interpolation (arXiv:2306.15595): every frequency / s.
- ``ntk``: static NTK-aware base scaling, written as a plain ``default`` block
  whose ``rope_theta`` is already ``theta * s^(d/(d-2))`` (transformers has no
  static-NTK type; its ``dynamic`` type recomputes the base per sequence).

What a RoPE block *means* (its validation, attention factor, how it is written
into an HF config, the NTK base and the canonical JSON used for hashing) is
owned by :mod:`nemo_rl.rope`; this module only decides which
block to write, refuses unsafe requests, patches a live model (top-level config,
nested ``text_config`` and every rotary-embedding module) and writes a receipt
an auditor can verify.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from nemo_rl.rope.blocks import STRUCTURAL_ROPE_KEYS, YARN, LinearScaling, NTKAwareScaling, YarnScaling, rotary_dim
from nemo_rl.rope.canonical import canonical_overrides_json
from nemo_rl.rope.hf_config import apply_hf_config_overrides, hf_rope_parameters, rope_theta_of
from nemo_rl.rope.rules import validate_long_context
from nemo_rl.utils.errors import ConfigError

Method = Literal["yarn", "ntk", "linear"]
METHODS: tuple[str, ...] = get_args(Method)
REFERENCES = ("arXiv:2309.00071", "arXiv:2306.15595")
RECEIPT_NAME = "long_context_receipt.json"
# Seed 002: "YaRN ... Stable at 4-32x". Only the upper edge is enforced: below 4x YaRN
# interpolates less and is still well behaved (Qwen ships factor 4, many recipes use 2).
YARN_STABLE_BAND = (4.0, 32.0)
# Seed 002: vanilla (eager) attention is memory-quadratic and "unusable past 16k".
QUADRATIC_ATTENTION = frozenset({"eager"})
QUADRATIC_ATTENTION_MAX_TOKENS = 16384
_PATH = "LongContextConfig"


# ----------------------------------------------------------------------------
# The knob
# ----------------------------------------------------------------------------
@dataclass(frozen=True)
class LongContextConfig:
    """One context-extension request.

    ``factor`` is relative to ``original_max_position_embeddings`` (default: the
    model config's ``max_position_embeddings``); the new window is
    ``ceil(factor * original)``. The YaRN knobs default to the paper's values
    and are refused for the other methods. ``allow_compounding`` lets a base
    that already ships RoPE scaling (e.g. Llama 3.1's ``llama3`` x8) be extended
    again at the compounded factor; ``force`` allows YaRN factors above
    ``YARN_STABLE_BAND``.
    """

    method: Method
    factor: float
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    truncate: bool = True
    allow_compounding: bool = False
    force: bool = False

    def __post_init__(self) -> None:
        errors = []
        if self.method not in METHODS:
            errors.append(f"{_PATH}.method: expected one of {', '.join(METHODS)}, got {self.method!r}")
        if not _is_number(self.factor):
            errors.append(f"{_PATH}.factor: must be a finite number, got {self.factor!r}")
        elif self.factor <= 1:
            errors.append(
                f"{_PATH}.factor: must be > 1, got {self.factor}; a factor <= 1 extends nothing "
                "(keep the model's own window instead)"
            )
        original = self.original_max_position_embeddings
        if original is not None and (not isinstance(original, int) or isinstance(original, bool) or original <= 0):
            errors.append(f"{_PATH}.original_max_position_embeddings: must be an integer > 0 or None, got {original!r}")
        if self.method in METHODS and self.method != YARN:
            errors += [
                f"{_PATH}.{f.name}: a YaRN knob, meaningless for method={self.method!r} (leave it at {f.default!r})"
                for f in dataclasses.fields(self)
                if f.name in _YARN_KNOBS and getattr(self, f.name) != f.default
            ]
        if not errors and self.method == YARN:
            errors += _stable_band_errors(self.factor, self.force, "factor")
        if errors:
            raise ConfigError(errors)

    def rope_block(self, model_config: Any) -> dict[str, Any]:
        """The canonical RoPE block (with ``rope_theta``) this request writes into ``model_config``.

        Validated by :mod:`nemo_rl.rope` (``YarnScaling.from_dict``
        for YaRN). Raises ConfigError if the request is refused for this config
        (compounding, stable band).
        """
        return self._plan(model_config).block

    def _plan(self, model_config: Any, path: str = "config") -> _Plan:
        params = hf_rope_parameters(model_config)
        if any(isinstance(v, Mapping) for v in params.values()):
            raise ConfigError(
                f"{path}: per-layer-type RoPE parameters ({', '.join(params)}) are not supported by apply_rope_scaling"
            )
        theta = rope_theta_of(model_config)
        existing = _existing_factor(model_config, params, path)
        factor = self.factor
        original = self.original_max_position_embeddings
        if existing is not None:
            compounded = existing * self.factor
            if not self.allow_compounding:
                raise ConfigError(
                    f"{path}: the base model already has rope_type={params.get('rope_type')!r} with factor "
                    f"{existing:g}; extending it by {self.factor:g} compounds to {compounded:g}x. Set "
                    f"allow_compounding=True to request the compounded factor {compounded:g} explicitly, "
                    "or start from a base model without RoPE scaling"
                )
            factor = compounded
            if self.method == YARN:
                what = f"compounded factor ({existing:g} x {self.factor:g})"
                _raise_if_any(_stable_band_errors(factor, self.force, what))
            original = original or params.get("original_max_position_embeddings")
            if original is None:
                raise ConfigError(
                    f"{path}: compounding rope_type={params.get('rope_type')!r} (factor {existing:g}) needs the "
                    "pre-extension window the compounded factor is relative to; set original_max_position_embeddings"
                )
        original = int(original or model_config.max_position_embeddings)
        new_max = math.ceil(factor * original)
        if self.method == YARN:
            scaling = YarnScaling(
                rope_theta=theta,
                factor=factor,
                original_max_position_embeddings=original,
                truncate=self.truncate,
                beta_fast=self.beta_fast,
                beta_slow=self.beta_slow,
                mscale=self.mscale,
                mscale_all_dim=self.mscale_all_dim,
            )
        elif self.method == "linear":
            scaling = LinearScaling(rope_theta=theta, factor=factor)
        else:
            scaling = NTKAwareScaling(theta, factor, _rotary_dim(model_config, params)).to_plain()
        block = scaling.to_block()
        # Re-parse the written block: the field rules (beta_fast > beta_slow, ...) live with the types.
        # Backend flags only matter for YaRN blocks.
        _, errors, _ = validate_long_context({"rope_scaling": block}, new_max, True, False)
        _raise_if_any(errors)
        return _Plan(block, factor, original, new_max, scaling.attention_factor, existing)


_YARN_KNOBS = ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate")


@dataclass(frozen=True)
class _Plan:
    block: dict[str, Any]
    factor: float
    original: int
    new_max: int
    attention_factor: float
    existing_factor: float | None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _raise_if_any(errors: list[str]) -> None:
    if errors:
        raise ConfigError(errors)


def _stable_band_errors(factor: float, force: bool, what: str) -> list[str]:
    low, high = YARN_STABLE_BAND
    if factor <= high or force:
        return []
    return [
        f"{_PATH}: YaRN {what} = {factor:g} is above its stable band ({low:g}-{high:g}x, seed 002); "
        f"pass force=True to apply it anyway, or pick a base model with a longer pretraining window"
    ]


def _existing_factor(model_config: Any, params: Mapping[str, Any], path: str) -> float | None:
    """The factor of a RoPE scaling the base already ships, or None for plain RoPE."""
    rope_type = params.get("rope_type", "default")
    if rope_type in ("default", getattr(model_config, "default_rope_type", "default")):
        return None
    factor = params.get("factor")
    if not _is_number(factor):
        raise ConfigError(
            f"{path}: the base model already has rope_type={rope_type!r} without a numeric factor ({factor!r}); "
            "cannot tell what extending it would compound to"
        )
    return float(factor)


def _rotary_dim(model_config: Any, params: Mapping[str, Any]) -> int:
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    partial = params.get("partial_rotary_factor", getattr(model_config, "partial_rotary_factor", None)) or 1.0
    return rotary_dim(head_dim, partial)


# ----------------------------------------------------------------------------
# Attention implementation
# ----------------------------------------------------------------------------
def installed_attention_implementations() -> set[str]:
    """The attention implementations this environment can run (sdpa and eager always)."""
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

    found = {"sdpa", "eager"}
    if is_flash_attn_2_available():
        found.add("flash_attention_2")
    if is_flash_attn_3_available():
        found.add("flash_attention_3")
    return found


def select_attention_implementation(
    device_capability: tuple[int, int] | None, available: set[str] | None = None
) -> str:
    """FA3 on Hopper (sm 9.x), FA2 on Ampere or newer (sm >= 8.0), else ``sdpa``.

    ``device_capability`` is ``torch.cuda.get_device_capability()`` or None
    (no GPU). ``available`` defaults to what is installed here. ``sdpa`` ships
    with torch, so it is the fallback whatever ``available`` says.
    """
    if device_capability is not None and (
        len(device_capability) != 2 or not all(isinstance(v, int) for v in device_capability)
    ):
        raise ValueError(f"device_capability must be (major, minor) or None, got {device_capability!r}")
    available = installed_attention_implementations() if available is None else set(available)
    if device_capability is None:
        return "sdpa"
    major = device_capability[0]
    if major == 9 and "flash_attention_3" in available:
        return "flash_attention_3"
    if major >= 8 and "flash_attention_2" in available:
        return "flash_attention_2"
    return "sdpa"


def check_attention_for_context(attn_implementation: str | None, context_length: int) -> None:
    """Refuse a memory-quadratic attention implementation past ``QUADRATIC_ATTENTION_MAX_TOKENS``."""
    if attn_implementation in QUADRATIC_ATTENTION and context_length > QUADRATIC_ATTENTION_MAX_TOKENS:
        raise ConfigError(
            f"attn_implementation={attn_implementation!r} is memory-quadratic in sequence length and unusable "
            f"past {QUADRATIC_ATTENTION_MAX_TOKENS} tokens, but the extended window is {context_length}; load the "
            "model with attn_implementation='sdpa' or flash attention ('flash_attention_2' on Ampere, "
            "'flash_attention_3' on Hopper; see select_attention_implementation)"
        )


# ----------------------------------------------------------------------------
# Patching a live model
# ----------------------------------------------------------------------------
def _rope_configs(config: Any) -> list[tuple[str, Any]]:
    """(path, config) for the top-level config and nested language configs that carry RoPE."""
    candidates = [("config", config)]
    inner = getattr(config, "text_config", None)
    if inner is not None:
        candidates.append(("config.text_config", inner))
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        text = get_text(decoder=True)
        if all(text is not c for _, c in candidates):
            candidates.append(("config.get_text_config()", text))
    return [(path, c) for path, c in candidates if hf_rope_parameters(c) or getattr(c, "rope_theta", None)]


def _is_rotary(module: Any) -> bool:
    return any(hasattr(module, name) for name in ("inv_freq", "rope_init_fn", "attention_scaling"))


def _build_rotary(module: Any, config: Any) -> Any:
    """A fresh instance of the module's own class from ``config`` (its __init__ is the RoPE init)."""
    cls = type(module)
    try:
        return cls(config)
    except TypeError as positional_error:
        try:
            return cls(config=config)
        except TypeError:
            raise TypeError(
                f"cannot re-initialise rotary module {cls.__name__} from a config: {positional_error}"
            ) from positional_error


def _adopt(module: Any, fresh: Any) -> None:
    """Give ``module`` the buffers and RoPE attributes of ``fresh``, keeping its identity, device and hooks."""
    import torch

    device = next((b.device for b in module.buffers(recurse=False)), None)
    for name, buffer in fresh.named_buffers(recurse=False):
        buffer = buffer.to(device) if device is not None else buffer
        if name in module._buffers:
            module._buffers[name] = buffer
        else:
            module.register_buffer(name, buffer, persistent=name not in fresh._non_persistent_buffers_set)
    for name, value in vars(fresh).items():
        if name.startswith("_") or name in ("training", "config") or isinstance(value, (torch.Tensor, torch.nn.Module)):
            continue
        setattr(module, name, value)


def run_overrides(cfg: LongContextConfig | None, model_config: Any) -> dict[str, Any] | None:
    """The ``policy.hf_config_overrides`` that make a run train (and vLLM generate) with ``cfg``'s RoPE.

    The same block :func:`apply_rope_scaling` writes into an HF model, so a
    model extended in memory and one trained through a recipe compute the same
    RoPE; ``None`` (no extension) gives no overrides: plain RoPE at any length.
    """
    return None if cfg is None else {"rope_scaling": cfg.rope_block(model_config)}


def apply_rope_scaling(model: Any, cfg: LongContextConfig) -> dict[str, Any]:
    """Extend ``model``'s context in place and return the receipt (see ``make_receipt``).

    Every config carrying RoPE (the top-level config and a nested
    ``text_config``, as VLMs and some MoE models have) gets the whole block,
    ``rope_theta`` included, and ``max_position_embeddings`` = the new window;
    every rotary-embedding module reading one of those configs is rebuilt from
    the patched config by its own class, so the forward pass uses the new
    frequencies and attention factor. Everything is checked before anything is
    changed: a refused request leaves the model untouched.
    """
    if not isinstance(cfg, LongContextConfig):
        raise TypeError(f"cfg must be a LongContextConfig, got {type(cfg).__name__}")
    configs = _rope_configs(model.config)
    if not configs:
        raise ConfigError(f"{type(model.config).__name__} (nor a nested text_config) has no RoPE parameters")

    plans = {path: cfg._plan(c, path) for path, c in configs}
    first_path, first = next(iter(plans.items()))
    for path, plan in plans.items():
        if plan != first:
            raise ConfigError(
                f"{first_path} and {path} have different RoPE settings ({first.block} vs {plan.block}); "
                "refusing to guess which one the language tower reads"
            )
    for _, c in [("config", model.config), *configs]:
        check_attention_for_context(getattr(c, "_attn_implementation", None), first.new_max)

    # Patched copies first (rope_scaling writes the block whole, keeping rope_theta).
    patched = {}
    for _, c in configs:
        existing = hf_rope_parameters(c)
        block = {**{k: existing[k] for k in STRUCTURAL_ROPE_KEYS if k in existing}, **first.block}
        overrides = {"rope_scaling": block, "max_position_embeddings": first.new_max}
        patched[id(c)] = (c, apply_hf_config_overrides(c, overrides, first.new_max))

    rotary = [(n, m) for n, m in model.named_modules() if _is_rotary(m) and getattr(m, "config", None) is not None]
    ours = [(name, m) for name, m in rotary if id(m.config) in patched]
    # A rotary module reading a *copy* of a language config would keep the old RoPE (vision towers'
    # rotary modules read their own config classes and are left alone).
    language_types = {type(c) for c, _ in patched.values()}
    stray = [name for name, m in rotary if id(m.config) not in patched and type(m.config) in language_types]
    if stray or not ours:
        raise RuntimeError(
            f"rotary modules reading a copy of a config that apply_rope_scaling patches: {stray}"
            if stray
            else f"no rotary-embedding module of {type(model).__name__} reads the patched configs; "
            "patching the config alone would not change the forward pass"
        )
    fresh = [(m, _build_rotary(m, patched[id(m.config)][1])) for _, m in ours]

    for live, new in patched.values():
        if hasattr(live, "rope_parameters"):  # transformers >= 5: one dict, rope_theta inside
            live.rope_parameters = dict(new.rope_parameters)
        else:
            live.rope_theta = new.rope_theta
            live.rope_scaling = dict(new.rope_scaling)
        live.max_position_embeddings = new.max_position_embeddings
        if getattr(live, "original_max_position_embeddings", None) is not None:
            # transformers prefers this top-level field (Phi-3) over the block's own value.
            live.original_max_position_embeddings = first.original
    for module, new in fresh:
        _adopt(module, new)

    return make_receipt(
        cfg,
        first,
        patched_configs=[path for path, _ in configs],
        rotary_modules=[name for name, _ in ours],
        attn_implementation=getattr(configs[-1][1], "_attn_implementation", None),
    )


# ----------------------------------------------------------------------------
# Receipt
# ----------------------------------------------------------------------------
def make_receipt(
    cfg: LongContextConfig,
    plan: _Plan,
    patched_configs: Iterable[str] = (),
    rotary_modules: Iterable[str] = (),
    attn_implementation: str | None = None,
) -> dict[str, Any]:
    """``{"long_context": {...}, "sha256": ...}``; ``factor`` is the applied (compounded) factor."""
    yarn = cfg.method == YARN
    return _receipt(
        cfg.method,
        plan.factor,
        plan.original,
        plan.new_max,
        plan.attention_factor,
        cfg.beta_fast if yarn else None,
        cfg.beta_slow if yarn else None,
        {
            "rope_block": dict(plan.block),
            "compounded_from_factor": plan.existing_factor,
            "patched_configs": list(patched_configs),
            "rotary_modules": list(rotary_modules),
            "attn_implementation": attn_implementation,
        },
    )


def run_receipt(
    yarn: YarnScaling, rope_block: Mapping[str, Any], max_total_sequence_length: int, engines: Iterable[str]
) -> dict[str, Any]:
    """The receipt of a run configured through ``policy.hf_config_overrides`` (trainer and generator)."""
    return _receipt(
        YARN,
        yarn.factor,
        yarn.original_max_position_embeddings,
        max(math.ceil(yarn.factor * yarn.original_max_position_embeddings), max_total_sequence_length),
        yarn.attention_factor,
        yarn.beta_fast,
        yarn.beta_slow,
        {"rope_block": dict(rope_block), "engines": list(engines)},
    )


def _receipt(
    method: str,
    factor: float,
    original: int,
    new_max: int,
    attn_factor: float,
    beta_fast: float | None,
    beta_slow: float | None,
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    """The block in the receipt format auditors read (its first eight keys, in this order), then ``extra``."""
    block = {
        "method": method,
        "factor": factor,
        "original_max_position_embeddings": original,
        "new_max_position_embeddings": new_max,
        "attn_factor": attn_factor,
        "beta_fast": beta_fast,
        "beta_slow": beta_slow,
        "papers": list(REFERENCES),
        **extra,
    }
    return {"long_context": block, "sha256": receipt_sha256(block)}


def receipt_sha256(long_context: Mapping[str, Any]) -> str:
    """SHA-256 of the block's canonical JSON (sorted keys, compact, integral floats as ints)."""
    return hashlib.sha256(canonical_overrides_json(long_context).encode("ascii")).hexdigest()


def write_receipt(receipt: Mapping[str, Any], run_dir: str | os.PathLike) -> Path:
    """Write ``run_dir/long_context_receipt.json`` atomically; refuses a receipt whose hash does not match."""
    if not _receipt_ok(receipt):
        raise ValueError("receipt's sha256 does not match its long_context block; refusing to write it")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / RECEIPT_NAME
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=f".{RECEIPT_NAME}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(receipt, f, indent=2, allow_nan=False)  # key order is the format's; the hash sorts
            f.write("\n")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def verify_receipt(path: str | os.PathLike) -> bool:
    """True when the file is a receipt whose sha256 matches its long_context block.

    A missing file raises FileNotFoundError; unreadable JSON, a wrong shape or
    a mismatching hash give False.
    """
    text = Path(path).read_text(encoding="utf-8")
    try:
        receipt = json.loads(text)
    except json.JSONDecodeError:
        return False
    return _receipt_ok(receipt)


def _receipt_ok(receipt: Any) -> bool:
    if not isinstance(receipt, Mapping) or set(receipt) != {"long_context", "sha256"}:
        return False
    block, digest = receipt["long_context"], receipt["sha256"]
    if not isinstance(block, Mapping) or not isinstance(digest, str):
        return False
    try:
        expected = receipt_sha256(block)
    except (TypeError, ValueError):
        return False
    return hmac.compare_digest(expected, digest)
