"""The canonical JSON of ``policy.hf_config_overrides`` and its hash (the converted-checkpoint cache's name)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from nemo_rl.rope.blocks import BLOCK_KEYS, CANONICAL_BLOCK_KEY, canonical_value, checked_rope_block


def canonical_overrides_json(overrides: Mapping[str, Any] | None) -> str:
    """The overrides as JSON that is equal exactly when the overrides mean the same thing.

    Sorted keys, no whitespace, integral floats written as ints (YAML `2` and
    `2.0` are one setting), the block always under `rope_scaling` with
    `rope_type`. None and {} both give "{}".
    """
    block = checked_rope_block(overrides)
    normalised = {k: v for k, v in (overrides or {}).items() if k not in BLOCK_KEYS}
    if block is not None:
        normalised[CANONICAL_BLOCK_KEY] = block.params
    return json.dumps(
        canonical_value(normalised), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def overrides_hash(overrides: Mapping[str, Any] | None) -> str:
    """12 hex digits naming an override set, e.g. in converted-checkpoint directory names.

    No overrides (None or {}) hash as "{}": 44136fa355b3.
    """
    return hashlib.sha256(canonical_overrides_json(overrides).encode("ascii")).hexdigest()[:12]
