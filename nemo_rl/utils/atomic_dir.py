"""Directories that appear complete or not at all.

Built-in assets and converted checkpoints are produced by whichever process
asks first, possibly several at once (Ray workers, parallel runs), and a
process can die mid-write. Building in a temporary sibling under a file lock and
renaming it into place makes concurrent callers build once and means a crash
never leaves a directory that passes ``is_complete``. A caller that finds the
lock held says that it waits (a run blocked behind another one's conversion
is otherwise indistinguishable from a hung one), and the next builder removes
what a crashed one left (a converted checkpoint's temporary copy can be as
large as the model).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

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
    with _build_lock(target):
        if is_complete(target) and not force:  # another process finished while we waited
            return False
        _remove_leftovers(target)
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


@contextmanager
def _build_lock(target: Path) -> Iterator[None]:
    """``target``'s file lock (an OS lock: a builder that dies releases it); a caller that must wait says so."""
    lock = FileLock(str(target) + ".lock")
    try:
        lock.acquire(blocking=False)
    except Timeout:
        logger.info("Waiting for the lock %s: another process is building %s", lock.lock_file, target)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _remove_leftovers(target: Path) -> None:
    """Temporary and replaced copies of ``target`` that a builder killed mid-way left; called under the lock,
    when no other process can be writing one."""
    name = glob.escape(target.name)
    for leftover in [*target.parent.glob(f"{name}.tmp-*"), *target.parent.glob(f"{name}.stale-*")]:
        logger.warning("Removing %s, left by a build of %s that did not finish", leftover, target)
        shutil.rmtree(leftover, ignore_errors=True)


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
