"""Where nemo_rl keeps what it builds once and reuses: built-in assets and converted checkpoints.

Everything lives under one overridable root so tests (and users with a small
home directory) can redirect all of it with a single environment variable.
Only paths are computed here; creating directories is left to the writers,
which do it atomically.
"""

from __future__ import annotations

import os
from pathlib import Path


def nemo_rl_cache_dir() -> Path:
    """``$NEMO_RL_CACHE_DIR``, else ``$XDG_CACHE_HOME/nemo_rl``, else ``~/.cache/nemo_rl`` (XDG convention)."""
    explicit = os.environ.get("NEMO_RL_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "nemo_rl"


def megatron_checkpoint_root() -> Path:
    """``$NRL_MEGATRON_CHECKPOINT_DIR``, else ``<cache dir>/megatron_checkpoints``.

    Converted checkpoints of large models can be big, so they get their own
    override (e.g. a shared scratch file system) independent of the cache dir.
    """
    explicit = os.environ.get("NRL_MEGATRON_CHECKPOINT_DIR")
    return Path(explicit).expanduser() if explicit else nemo_rl_cache_dir() / "megatron_checkpoints"
