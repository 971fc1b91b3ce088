"""The built-in ``python-stdlib`` long-document corpus: the running interpreter's standard library sources.

Continued pre-training for context extension needs long, real documents, and
nothing may be downloaded. Every machine that runs this project has a Python
standard library: about 1,700 source files (tens of millions of characters),
hundreds of them longer than 4k tokens, with the long-range structure real code
has (imports used far below, names defined once and used throughout). It is
the offline stand-in for PG19 or a code-repository dump.

The split is a function of each file's path relative to the library root, so it
is the same on every machine with the same Python version, whatever the install
prefix, and a file never moves between splits when others are added.
"""

from __future__ import annotations

import os
import sys
import sysconfig
import zlib
from pathlib import Path

from nemo_rl.data.jsonl_splits import write_splits

VALIDATION_PERCENT = 5  # of files, chosen by a hash of the relative path
_SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def corpus_name() -> str:
    """The cache name: the library is the interpreter's, so each Python minor version has its own corpus."""
    return f"python-stdlib-{sys.version_info.major}.{sys.version_info.minor}"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(relative_path: str) -> str:
    return "validation" if zlib.crc32(relative_path.encode()) % 100 < VALIDATION_PERCENT else "train"


def stdlib_documents(root: Path | None = None) -> list[dict[str, str]]:
    """``{"text", "path"}`` for every UTF-8 ``.py`` file under the library root, in path order.

    Installed third-party packages are not the standard library and are skipped,
    as are empty files and files that are not valid UTF-8 (a few test fixtures).
    """
    root = Path(root or stdlib_root())
    rows = []
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_DIRS)
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = Path(directory) / name
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if text.strip():
                rows.append({"text": text, "path": path.relative_to(root).as_posix()})
    return rows


def write_python_stdlib(out_dir: Path) -> dict[str, Path]:
    """``train.jsonl`` and ``validation.jsonl`` of ``{"text", "path"}`` rows in ``out_dir``."""
    rows = stdlib_documents()
    if not rows:
        raise RuntimeError(f"no Python sources found under {stdlib_root()}: the corpus cannot be built here")
    return write_splits(out_dir, lambda split: [row for row in rows if split_of(row["path"]) == split])
