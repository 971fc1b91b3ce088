"""Row files: JSONL and Parquet read alike; anything else, or a bad line, is named in the error."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nemo_rl.data.rows import read_rows

ROWS = [{"messages": [{"role": "user", "content": "What is 2 + 3?"}], "answer": "5"}, {"messages": [], "answer": "x"}]


def test_jsonl_and_parquet_give_the_same_rows(tmp_path):
    import json

    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(row) for row in ROWS[:1]) + "\n\n  \n" + json.dumps(ROWS[1]) + "\n")
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    assert read_rows(jsonl) == read_rows(tmp_path / "d.parquet") == ROWS


def test_a_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"answer": "1"}\n\n{"answer": \n')
    with pytest.raises(ValueError, match=r"d\.jsonl:3: not valid JSON"):
        read_rows(path)
    path.write_text('{"answer": "1"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: expected a JSON object"):
        read_rows(path)


def test_an_unsupported_suffix_names_the_supported_ones(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("[]")
    with pytest.raises(ValueError, match=r"unsupported data file suffix '\.json'; supported: \.jsonl, \.parquet"):
        read_rows(path)
