"""The cache of HF checkpoints converted to Megatron layout.

A converted checkpoint depends on the HF weights *and* on ``hf_config_overrides``
(the RoPE block changes what the model computes), so its directory is named
``<model>__hfovr_<hash>`` with the hash from ``overrides_hash``:
two override sets can never share a cache entry. Conversion goes through
:func:`nemo_rl.utils.atomic_dir.build_atomically` (temporary sibling, file lock,
rename), so concurrent workers convert once and a crash never leaves a
directory that looks usable. The manifest also records a fingerprint of the
source files (names, sizes, modification times: cheap even for a 16 GB model),
so a model directory whose weights changed since (a rebuilt built-in, a
re-exported run) is converted again instead of silently reusing old weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig

from nemo_rl.models.megatron.hf_weights import hf_to_megatron
from nemo_rl.rope.canonical import canonical_overrides_json, overrides_hash
from nemo_rl.rope.hf_config import apply_hf_config_overrides
from nemo_rl.utils.atomic_dir import build_atomically
from nemo_rl.utils.cache_paths import megatron_checkpoint_root

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "conversion.json"  # written last: its presence marks a complete conversion
FORMAT_VERSION = 1


def cache_dir_name(model_name: str, overrides: Mapping[str, Any] | None) -> str:
    base = model_name.strip("/").replace("/", "__")
    if not overrides:
        return base
    return f"{base}__hfovr_{overrides_hash(overrides)}"


def converted_checkpoint_dir(model_name: str, overrides: Mapping[str, Any] | None, root: Path | None = None) -> Path:
    return (root or megatron_checkpoint_root()) / cache_dir_name(model_name, overrides)


def is_complete(path: Path) -> bool:
    return (path / MANIFEST_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def source_fingerprint(model_path: Path) -> str:
    """A digest of the HF directory's weight and config files by name, size and modification time."""
    files = sorted([*Path(model_path).glob("*.safetensors"), Path(model_path) / "config.json"])
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]


def _is_current(path: Path, fingerprint: str) -> bool:
    """A complete conversion of the source as it is now."""
    if not is_complete(path):
        return False
    return json.loads((path / MANIFEST_FILE).read_text()).get("source_fingerprint") == fingerprint


def load_hf_state_dict(model_path: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF safetensors checkpoint (single file or sharded with an index)."""
    files = sorted(model_path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_path}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                state[key] = handle.get_tensor(key)
    return state


def _convert_into(
    tmp: Path, model_path: Path, overrides: Mapping[str, Any] | None, max_total_sequence_length: int
) -> None:
    hf_config = apply_hf_config_overrides(AutoConfig.from_pretrained(model_path), overrides, max_total_sequence_length)
    mcore_state = hf_to_megatron(load_hf_state_dict(model_path), hf_config)
    save_file({k: v.contiguous() for k, v in mcore_state.items()}, str(tmp / WEIGHTS_FILE))
    hf_config.save_pretrained(tmp)
    manifest = {
        "format_version": FORMAT_VERSION,
        "source": str(model_path),
        "source_fingerprint": source_fingerprint(model_path),
        "hf_config_overrides": json.loads(canonical_overrides_json(overrides or {})),
        "overrides_hash": overrides_hash(overrides or {}),
        # The installed distribution's version: importing megatron-core for it would cost seconds per process.
        "megatron_core_version": version("megatron-core"),
        "created_unix": time.time(),
    }
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))


def ensure_converted(
    model_path: Path,
    model_name: str,
    overrides: Mapping[str, Any] | None,
    max_total_sequence_length: int,
    force_reconvert: bool = False,
    root: Path | None = None,
) -> tuple[Path, bool]:
    """The converted checkpoint for (model, overrides), and whether this call converted it."""
    target = converted_checkpoint_dir(model_name, overrides, root)
    fingerprint = source_fingerprint(model_path)
    if force_reconvert and is_complete(target):
        reason = "force_reconvert_from_hf=true"
    elif is_complete(target):
        reason = "the source model changed since it was converted"
    else:
        reason = "no cached conversion"
    built = build_atomically(
        target,
        lambda tmp: _convert_into(tmp, model_path, overrides, max_total_sequence_length),
        lambda path: _is_current(path, fingerprint),
        force=force_reconvert,
    )
    if built:
        logger.info("Converted %s to Megatron format at %s (%s)", model_path, target, reason)
    else:
        logger.info("Reusing converted Megatron checkpoint %s", target)
    return target, built
