"""Dataset rows from a file, whatever the format it was shipped in.

Chat and prompt datasets arrive as JSONL (what the built-ins write and what is
easy to make by hand) or as Parquet (how hub datasets are usually stored).
Reading both into the same plain list of dicts keeps every loader format-blind,
so a dataset never has to be converted before a run can use it.
"""

from __future__ import annotations

import json
from pathlib import Path

from nemo_rl.utils.errors import DataError

SUPPORTED_SUFFIXES = (".jsonl", ".parquet")


def read_rows(path: Path) -> list[dict]:
    """The rows of a ``.jsonl`` (one JSON object per non-empty line) or ``.parquet`` file, in file order."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # only runs that read Parquet pay for the import

        return pq.read_table(path).to_pylist()
    raise DataError(f"{path}: unsupported data file suffix {path.suffix!r}; supported: {', '.join(SUPPORTED_SUFFIXES)}")


def _read_jsonl(path: Path) -> list[dict]:
    rows: list[dict] = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_no}: not valid JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows
