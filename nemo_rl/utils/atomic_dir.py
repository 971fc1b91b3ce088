"""Directories that appear complete or not at all.

Built-in assets and converted checkpoints are produced by whichever process
asks first, possibly several at once (Ray workers, parallel runs), and a
process can die mid-write. Building in a temporary sibling under a file lock and
renaming it into place makes concurrent callers build once and means a crash
never leaves a directory that passes ``is_complete``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

logger = logging.getLogger(__name__)


def build_atomically(
    target: Path,
    build: Callable[[Path], object],
    is_complete: Callable[[Path], bool],
    force: bool = False,
) -> bool:
    """Make ``target`` by ``build(tmp_dir)`` unless a complete one exists (or ``force``); True if built.

    ``build`` must write its completion evidence (what ``is_complete`` checks) last.
    """
    if is_complete(target) and not force:
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if is_complete(target) and not force:  # another process finished while we waited
            return False
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        try:
            build(tmp)
            if target.exists():
                stale = target.with_name(f"{target.name}.stale-{os.getpid()}")
                os.rename(target, stale)
                os.rename(tmp, target)
                shutil.rmtree(stale, ignore_errors=True)
            else:
                os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return True
