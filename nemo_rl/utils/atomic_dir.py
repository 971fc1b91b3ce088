"""Directories that appear complete or not at all.

Built-in assets and converted checkpoints are produced by whichever process
asks first, possibly several at once (Ray workers, parallel runs), and a
process can die mid-write. Building in a temporary sibling under a file lock and
renaming it into place makes concurrent callers build once and means a crash
never leaves a directory that passes ``is_complete``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

logger = logging.getLogger(__name__)

COMPLETE_MARKER = ".nemo_rl_complete"  # written last inside the temporary dir, before the rename


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


def is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file()


def _write_with_marker(build: Callable[[Path], object]) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        build(tmp)
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"created_unix": time.time()}))

    return write


def materialize(target: Path, build: Callable[[Path], object]) -> Path:
    """``target``, built by ``build(tmp_dir)`` unless a complete copy (with the marker written last) exists.

    Built-in models and datasets are made this way on first use. A ``target`` left
    without the marker (e.g. made by hand or by an older layout) is replaced, not trusted.
    """
    if build_atomically(target, _write_with_marker(build), is_complete):
        logger.info("Created built-in asset %s", target)
    return target
