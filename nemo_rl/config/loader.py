"""YAML recipes: `defaults:` chaining, Hydra-syntax command-line overrides, resolvers.

Recipes are small YAML files that name the files they specialise under a
top-level ``defaults:`` key, so a long-context recipe states only what differs
from ``examples/configs/sft.yaml``. Overrides use Hydra's grammar (parsed by
Hydra itself, so quoting and typing match what users know from Hydra) but are
applied with plain OmegaConf: this project composes files, not config groups.

Nothing here creates directories or touches the cluster until a caller asks for
a file to be written (`save_config`), so a bad recipe costs nothing.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nemo_rl.utils.errors import ConfigError, nearest_key

DEFAULTS_KEY = "defaults"


# ----------------------------------------------------------------------------
# Resolvers
# ----------------------------------------------------------------------------
Number = int | float


def _numbers(name: str, args: Sequence[Any]) -> Sequence[Number]:
    """Reject non-numbers: a silently coerced string or bool would hide a recipe typo."""
    if not args:
        raise ValueError(f"${{{name}:...}} needs at least one argument")
    for arg in args:
        if isinstance(arg, bool) or not isinstance(arg, (int, float)):
            raise TypeError(f"${{{name}:...}} takes numbers, got {arg!r}")
    return args


def _div(numerator: Any, denominator: Any) -> float:
    """True division, so `factor: ${div:1024,256}` is the float 4.0 that RoPE code expects."""
    a, b = _numbers("div", (numerator, denominator))
    if b == 0:
        raise ZeroDivisionError(f"${{div:{a},{b}}} divides by zero")
    return a / b


def _mul(*args: Any) -> Number:
    return math.prod(_numbers("mul", args))


def _add(*args: Any) -> Number:
    return sum(_numbers("add", args))


def _max(*args: Any) -> Number:
    return max(_numbers("max", args))


# `replace=True` keeps registration idempotent (re-imports, reloads in tests) and
# guarantees these semantics even if another library registered the same names.
for _name, _resolver in {"div": _div, "mul": _mul, "add": _add, "max": _max}.items():
    OmegaConf.register_new_resolver(_name, _resolver, replace=True)


# ----------------------------------------------------------------------------
# Loading with `defaults:`
# ----------------------------------------------------------------------------
def load_config(path: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """The recipe at `path` merged over its `defaults:` chain, with `overrides` applied.

    Interpolations stay unresolved so that an override of
    `policy.max_total_sequence_length` still flows into values computed from it;
    call `resolve_config` once everything is composed.
    """
    cfg = _load_with_defaults(Path(path).resolve(), ())
    apply_overrides(cfg, overrides)
    return cfg


def _load_with_defaults(path: Path, chain: tuple[Path, ...]) -> DictConfig:
    """Depth-first: each default is fully composed before the next one is merged over it."""
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError(f"cycle in `{DEFAULTS_KEY}:` chain: {cycle}")
    own = _read_yaml(path, chain[-1] if chain else None)
    merged = OmegaConf.create()
    for parent in _default_paths(own, path):
        merged = OmegaConf.merge(merged, _load_with_defaults(parent, (*chain, path)))
    return cast(DictConfig, OmegaConf.merge(merged, own))  # merging two DictConfigs gives a DictConfig


def redundant_keys(path: str | Path) -> list[str]:
    """Dotted keys a recipe sets to exactly what its `defaults:` chain already gives.

    A recipe should state only what differs from its base (a reader sees the
    run's intent at a glance, and a changed base default reaches every recipe
    that did not mean to pin it). Values are compared unresolved, so
    `${div:...}` written again counts as a repeat.
    """
    path = Path(path).resolve()
    own = _read_yaml(path, None)
    inherited = OmegaConf.create()
    for parent in _default_paths(own, path):
        inherited = OmegaConf.merge(inherited, _load_with_defaults(parent, (path,)))
    base = OmegaConf.to_container(inherited, resolve=False)
    return [
        key for key, value in _leaf_items(OmegaConf.to_container(own, resolve=False)) if _lookup(base, key) == value
    ]


def _leaf_items(container: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in container.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _leaf_items(value, dotted + ".")
        else:
            yield dotted, value


_MISSING = object()


def _lookup(container: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(container, dict) or part not in container:
            return _MISSING
        container = container[part]
    return container


def _read_yaml(path: Path, included_from: Path | None) -> DictConfig:
    where = f" (listed in `{DEFAULTS_KEY}:` of {included_from})" if included_from else ""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found{where}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:  # yaml's parser errors share no useful base class with OmegaConf's
        raise ConfigError(f"{path}: cannot parse YAML{where}: {err}") from err
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: top level must be a mapping, not a list{where}")
    return cfg


def _default_paths(own: DictConfig, path: Path) -> list[Path]:
    """Pop `defaults:` from `own` (it is composition syntax, not configuration)."""
    if DEFAULTS_KEY not in own:
        return []
    raw = cast(dict[str, Any], OmegaConf.to_container(own, resolve=False))[DEFAULTS_KEY]
    del own[DEFAULTS_KEY]
    entries = raw if isinstance(raw, list) else [raw]
    bad = [entry for entry in entries if not isinstance(entry, str)]
    if bad:
        raise ConfigError(f"{path}: `{DEFAULTS_KEY}:` must be a path or a list of paths, got {bad[0]!r}")
    return [(path.parent / entry).resolve() for entry in entries]


# ----------------------------------------------------------------------------
# Command-line overrides
# ----------------------------------------------------------------------------
def apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """Apply Hydra-syntax overrides in order, reporting every bad one at once."""
    parser = OverridesParser.create()
    errors: list[str] = []
    for line in overrides:
        try:
            _apply_override(cfg, _parse_override(parser, line))
        except ConfigError as err:
            errors.extend(err.messages)
    if errors:
        raise ConfigError(errors)


def override_value(value: Any) -> str:
    """``value`` in Hydra override syntax, so tools can build command lines from Python values.

    ``{"rope_scaling": {"rope_type": "linear", "factor": 4.0}}`` gives
    ``{rope_scaling:{rope_type:'linear',factor:4.0}}``.
    """
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{key}:{override_value(item)}" for key, item in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_value(item) for item in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return repr(value)


def _parse_override(parser: OverridesParser, line: str) -> Override:
    try:
        override = parser.parse_override(line)
    except HydraException as err:
        raise ConfigError(f"cannot parse override {line!r}: {err}") from err
    if override.is_sweep_override() or override.package is not None:
        raise ConfigError(f"override {line!r}: sweeps and @package are Hydra launcher features, not supported here")
    return override


def _apply_override(cfg: DictConfig, override: Override) -> None:
    key = override.key_or_group
    keys = _dotted_keys(OmegaConf.to_container(cfg, resolve=False))
    exists = key in keys
    if override.type is OverrideType.DEL:
        _delete(cfg, override, exists, keys)
    elif override.type is OverrideType.ADD:
        if exists:
            raise ConfigError(f"+{key}: key already exists; use {key}=... to change it or ++{key}=... to add or change")
        OmegaConf.update(cfg, key, override.value(), merge=True, force_add=True)
    elif override.type is OverrideType.FORCE_ADD:
        OmegaConf.update(cfg, key, override.value(), merge=True, force_add=True)
    elif not exists:  # OverrideType.CHANGE, the last of Hydra's four forms
        raise ConfigError(f"{key}: no such key{_suggestion(key, keys)}; to add a new key use +{override.input_line}")
    else:
        OmegaConf.update(cfg, key, override.value(), merge=True)


def _delete(cfg: DictConfig, override: Override, exists: bool, keys: list[str]) -> None:
    """`~key` deletes; `~key=value` deletes only if the current value matches (Hydra semantics)."""
    key = override.key_or_group
    if not exists:
        raise ConfigError(f"~{key}: no such key to delete{_suggestion(key, keys)}")
    if override.value_type is not None:
        current = OmegaConf.select(cfg, key)
        if OmegaConf.is_config(current):
            current = OmegaConf.to_container(current, resolve=True)
        if override.value() != current:
            raise ConfigError(f"{override.input_line}: current value is {current!r}, not {override.value()!r}")
    parent, _, leaf = key.rpartition(".")
    del (OmegaConf.select(cfg, parent) if parent else cfg)[leaf]


def _dotted_keys(container: Any, prefix: str = "") -> list[str]:
    """Every mapping key of a plain container as a dotted path, intermediate nodes included."""
    if not isinstance(container, Mapping):
        return []
    keys: list[str] = []
    for name, value in container.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        keys.extend(_dotted_keys(value, dotted + "."))
    return keys


def _suggestion(key: str, candidates: Iterable[str]) -> str:
    """Suggest only keys at the same depth: a typo rarely adds or drops a whole level."""
    match = nearest_key(key, [c for c in candidates if c.count(".") == key.count(".")])
    return f" (did you mean {match}?)" if match else ""


# ----------------------------------------------------------------------------
# Resolving, saving, entry-script arguments
# ----------------------------------------------------------------------------
def resolve_config(cfg: DictConfig) -> dict[str, Any]:
    """A plain dict with every interpolation resolved; failures name each bad key."""
    try:
        return cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True))
    except OmegaConfBaseException as err:
        raise ConfigError(_resolution_errors(cfg) or [str(err)]) from err


def _resolution_errors(cfg: DictConfig) -> list[str]:
    """Resolve leaf by leaf so that every broken interpolation is reported, not only the first."""
    errors = []
    for key in _leaf_keys(OmegaConf.to_container(cfg, resolve=False)):
        try:
            OmegaConf.select(cfg, key, throw_on_missing=True)
        except OmegaConfBaseException as err:
            errors.append(f"{key}: {str(err).splitlines()[0]}")
    return errors


def _leaf_keys(container: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(container, Mapping):
        items: Iterable[tuple[Any, Any]] = container.items()
    elif isinstance(container, list):
        items = enumerate(container)
    else:
        yield prefix.rstrip(".")
        return
    for name, value in items:
        yield from _leaf_keys(value, f"{prefix}{name}.")


def save_config(cfg: DictConfig | Mapping[str, Any], path: str | Path) -> None:
    """Write `cfg` as YAML that `load_config` reads back to the same configuration.

    The file's directory is created here because a run records its config
    before anything else writes to its log directory; this is the only write
    this module performs, and only on request.
    """
    path = Path(path)
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(node))


def parse_args(argv: Sequence[str] | None = None, *, default_config: str | Path) -> tuple[Path, list[str]]:
    """`--config PATH` plus Hydra-style overrides, for every entry script alike."""
    parser = argparse.ArgumentParser(
        description="Run a NeMo RL recipe.",
        epilog="Overrides: key=value (change), +key=value (add), ++key=value (add or change), ~key (delete).",
    )
    parser.add_argument("--config", type=Path, default=Path(default_config), help="recipe YAML (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="Hydra-syntax overrides, applied in order")
    # Intermixed: `--config` may follow the overrides, as it often does after editing a command line.
    args = parser.parse_intermixed_args(argv)
    return args.config, list(args.overrides)
