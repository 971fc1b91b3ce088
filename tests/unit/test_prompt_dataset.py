"""GRPO prompts: rendered for generation, long ones dropped (not cut), JSONL and Parquet alike, bad rows named."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from nemo_rl.data.builtin_datasets import resolve_dataset_paths
from nemo_rl.data.prompt_dataset import PromptSample, load_prompt_dataset
from nemo_rl.data.rows import read_rows
from nemo_rl.models.builtin_models import resolve_model_path
from nemo_rl.utils.errors import DataError


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model_path("tiny-qwen2"))


@pytest.fixture(scope="module")
def tiny_math_train() -> Path:
    return resolve_dataset_paths("tiny-math", None, None)[0]


def _question(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_builtin_prompts_end_with_the_generation_prompt(tokenizer, tiny_math_train):
    data = load_prompt_dataset(tiny_math_train, tokenizer, max_prompt_length=1024)
    assert (len(data), data.num_dropped) == (256, 0)
    for sample, row in zip(data.samples, read_rows(tiny_math_train)):
        assert isinstance(sample, PromptSample) and isinstance(sample.answer, str)
        assert sample.answer == row["answer"]
        text = tokenizer.decode(sample.input_ids)
        assert text.endswith("<|im_start|>assistant\n")
        assert row["messages"][-1]["content"] in text
    assert data[0] is data.samples[0]


def test_long_prompts_are_dropped_and_counted(tokenizer, tiny_math_train):
    full = load_prompt_dataset(tiny_math_train, tokenizer, max_prompt_length=1024)
    lengths = [len(sample.input_ids) for sample in full.samples]
    window = load_prompt_dataset(tiny_math_train, tokenizer, max_prompt_length=256)
    assert window.num_dropped == sum(n > 256 for n in lengths) > 0
    assert len(window) + window.num_dropped == len(full)
    assert window.samples == [s for s in full.samples if len(s.input_ids) <= 256]  # kept whole, in order
    at_limit = load_prompt_dataset(tiny_math_train, tokenizer, max_prompt_length=max(lengths))
    assert at_limit.num_dropped == 0  # a prompt exactly at the limit is kept


def test_no_surviving_prompt_names_the_limit_and_the_fix(tokenizer, tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"messages": _question("What is 2 + 3?"), "answer": 5}])
    with pytest.raises(ValueError, match=r"max_prompt_length=4.*policy\.max_total_sequence_length"):
        load_prompt_dataset(path, tokenizer, max_prompt_length=4)


def test_jsonl_and_parquet_give_identical_samples(tokenizer, tmp_path):
    rows = [
        {"messages": _question("What is 2 + 3?"), "answer": "5"},
        {"messages": [{"role": "system", "content": "Be brief."}, *_question("What is 9 - 4?")], "answer": "5"},
    ]
    jsonl = load_prompt_dataset(_write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, 128)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    parquet = load_prompt_dataset(tmp_path / "d.parquet", tokenizer, 128)
    assert parquet == jsonl and len(jsonl) == 2


def test_numeric_answers_become_strings(tokenizer, tmp_path):
    path = _write_jsonl(
        tmp_path / "d.jsonl",
        [{"messages": _question("2 + 3?"), "answer": 5}, {"messages": _question("1 / 2?"), "answer": 0.5}],
    )
    assert [s.answer for s in load_prompt_dataset(path, tokenizer, 128)] == ["5", "0.5"]


@pytest.mark.parametrize(
    "bad_row, problem",
    [
        ({"messages": _question("2 + 3?")}, "no 'answer' (the row has 'messages')"),
        ({"answer": "5"}, "no 'messages' (the row has 'answer')"),
        ({"prompt": "2 + 3?"}, "no 'messages' (the row has 'prompt')"),
        ({"messages": "2 + 3?", "answer": "5"}, "'messages' must be a non-empty list of messages, found a string"),
        ({"messages": _question("2 + 3?"), "answer": None}, "no 'answer' (the row has 'messages')"),
        ({"messages": _question("2 + 3?"), "answer": ""}, "'answer' must be a non-empty string or a number"),
        ({"messages": _question("2 + 3?"), "answer": True}, "'answer' must be a non-empty string or a number"),
    ],
)
def test_a_row_missing_a_key_is_named_with_the_expected_form(tokenizer, tmp_path, bad_row, problem):
    good = {"messages": _question("What is 2 + 3?"), "answer": "5"}
    path = _write_jsonl(tmp_path / "prompts.jsonl", [good, good, bad_row])
    with pytest.raises(
        DataError,
        match=rf"prompts\.jsonl: row 3: {re.escape(problem)}.*; (write each row as|give the row the reference answer)",
    ) as err:
        load_prompt_dataset(path, tokenizer, 128)
    assert '"messages": [' in str(err.value) and '"answer"' in str(err.value)
