"""Built-in datasets on disk: one JSONL file per split, the format recipes also accept for real data."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

SPLITS = ("train", "validation")


def write_splits(out_dir: Path, rows_of: Callable[[str], list[dict]]) -> dict[str, Path]:
    """Write ``<split>.jsonl`` (one JSON object per line) for every split; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split in SPLITS:
        paths[split] = out_dir / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(row) + "\n" for row in rows_of(split)), encoding="utf-8")
    return paths
