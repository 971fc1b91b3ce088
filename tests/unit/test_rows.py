"""Row files: JSONL, JSON and Parquet read alike; anything else, or a bad line, is named in the error."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nemo_rl.data.rows import load_rows, read_rows
from nemo_rl.utils.errors import DataError

ROWS = [{"messages": [{"role": "user", "content": "What is 2 + 3?"}], "answer": "5"}, {"messages": [], "answer": "x"}]


def test_jsonl_json_and_parquet_give_the_same_rows(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(row) for row in ROWS[:1]) + "\n\n  \n" + json.dumps(ROWS[1]) + "\n")
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    (tmp_path / "array.json").write_text(json.dumps(ROWS, indent=2))
    (tmp_path / "lines.json").write_text(jsonl.read_text())  # what `datasets` writes under a .json name
    for name in ("d.parquet", "array.json", "lines.json"):
        assert read_rows(tmp_path / name) == ROWS, name
    assert read_rows(jsonl) == ROWS


def test_rows_are_numbered_as_the_user_sees_them(tmp_path):
    """The line of a JSONL file (blank lines count), the 1-based index of a JSON array or Parquet table."""
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")
    assert [row.number for row in load_rows(jsonl, "{}")] == [1, 3]
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    assert [row.number for row in load_rows(tmp_path / "d.parquet", "{}")] == [1, 2]


def test_a_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"answer": "1"}\n\n{"answer": \n')
    with pytest.raises(ValueError, match=r"d\.jsonl:3: not valid JSON"):
        read_rows(path)
    path.write_text('{"answer": "1"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"d\.jsonl: row 2: expected an object, found a list; write it as"):
        read_rows(path)


def test_an_unsupported_suffix_names_the_supported_ones(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,b\n")
    with pytest.raises(
        DataError, match=r"unsupported data file suffix '\.csv' \(supported: \.jsonl, \.json, \.parquet\)"
    ):
        read_rows(path)
