"""Preference pairs: the built-in set, interleaved batches, reply-only masks, long pairs dropped, bad rows named."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from nemo_rl.data.builtin_datasets import resolve_dataset_paths
from nemo_rl.data.preference_dataset import collate_pairs, load_preference_dataset
from nemo_rl.data.rows import read_rows
from nemo_rl.data.tiny_chat import WORDS
from nemo_rl.data.tiny_preference import NUM_TRAIN, NUM_VALIDATION, generate_split
from nemo_rl.models.builtin_models import resolve_model_path
from nemo_rl.utils.errors import DataError


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model_path("tiny-qwen2"))


@pytest.fixture(scope="module")
def tiny_preference_train() -> Path:
    return resolve_dataset_paths("tiny-preference", None, None)[0]


def _row(question: str, chosen: str, rejected: str) -> dict:
    return {
        "context": [{"role": "user", "content": question}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _prompt_and_reply(ids: list[int], mask: list[int]) -> tuple[list[int], list[int]]:
    """The tokens before the first trained one, and the trained ones."""
    first = mask.index(1)
    return ids[:first], [t for t, m in zip(ids, mask) if m]


def test_builtin_pairs_load_interleaved_with_reply_only_masks(tokenizer, tiny_preference_train):
    data = load_preference_dataset(tiny_preference_train, tokenizer, max_seq_len=1024)
    assert (len(data), data.num_dropped) == (NUM_TRAIN, 0)
    rows = read_rows(tiny_preference_train)
    batch = collate_pairs(data.pairs[:8], pad_id=tokenizer.pad_token_id, divisible_by=16)
    assert batch["input_ids"].shape[0] == 16 and batch["input_ids"].shape[1] % 16 == 0
    for i, row in enumerate(rows[:8]):
        sides = []
        for r, key in ((2 * i, "chosen"), (2 * i + 1, "rejected")):
            length = int(batch["input_lengths"][r])
            ids, mask = batch["input_ids"][r, :length].tolist(), batch["loss_mask"][r, :length].tolist()
            assert not batch["loss_mask"][r, length:].any()
            prompt, reply = _prompt_and_reply(ids, mask)
            assert tokenizer.decode(reply) == row[key][0]["content"] + "<|im_end|>"
            sides.append(prompt)
        assert sides[0] == sides[1]  # the two rows of a pair share the context exactly


def test_pairs_with_a_side_too_long_are_dropped_and_counted(tokenizer, tmp_path, caplog):
    long_reply = " ".join(["red"] * 60)
    path = _write_jsonl(
        tmp_path / "d.jsonl",
        [_row("Hi", "ok", long_reply), _row("Hi", long_reply, "no"), _row("What is 1 + 1?", "1 + 1 = 2", "cat dog")],
    )
    data = load_preference_dataset(path, tokenizer, max_seq_len=32)
    assert (len(data), data.num_dropped) == (1, 2)
    assert "dropped 2 of 3 preference pairs" in caplog.text
    with pytest.raises(ValueError, match="raise policy.max_total_sequence_length"):
        load_preference_dataset(path, tokenizer, max_seq_len=8)


@pytest.mark.parametrize(
    "broken, problem",
    [
        (
            {"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
            "no 'context' (the row has 'chosen', 'rejected')",
        ),
        (
            {**_row("Hi", "a", "b"), "context": []},
            "'context' must be a non-empty list of messages, found an empty list",
        ),
        ({**_row("Hi", "a", "b"), "chosen": []}, "'chosen' must be a non-empty list of messages, found an empty list"),
        ({**_row("Hi", "a", "b"), "rejected": "b"}, "'rejected' must be a non-empty list of messages, found a string"),
        (
            {**_row("Hi", "a", "b"), "chosen": [{"role": "user", "content": "a"}]},
            "message 1 of 'chosen' has role 'user'",
        ),
    ],
)
def test_malformed_rows_name_the_file_and_row(tokenizer, tmp_path, broken, problem):
    path = _write_jsonl(tmp_path / "d.jsonl", [_row("Hi", "a", "b"), broken])
    with pytest.raises(DataError, match=rf"d\.jsonl: row 2: {re.escape(problem)}.*; (write each row as|keep the)"):
        load_preference_dataset(path, tokenizer, max_seq_len=1024)


def test_parquet_input_matches_jsonl(tokenizer, tmp_path):
    rows = [_row("What is 2 + 3?", "2 + 3 = 5", "2 + 3 = 7"), _row("Hi", "ok", "sun moon star")]
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    from_parquet = load_preference_dataset(parquet, tokenizer, max_seq_len=1024)
    from_jsonl = load_preference_dataset(_write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, max_seq_len=1024)
    assert from_parquet == from_jsonl and len(from_parquet) == 2


def test_generator_is_seeded_separable_and_reaches_past_the_window(tokenizer):
    train, validation = generate_split("train"), generate_split("validation")
    assert generate_split("train") == train and generate_split("train", seed=1) != train
    assert (len(train), len(validation)) == (NUM_TRAIN, NUM_VALIDATION)
    assert not {json.dumps(r) for r in train} & {json.dumps(r) for r in validation}
    off_topic = 0
    for row in train + validation:
        assert row["context"][-1]["role"] == "user"
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert chosen != rejected
        if set(rejected.split()) <= set(WORDS):
            off_topic += 1
        else:  # a wrong number in the chosen answer's form
            assert rejected.rsplit(" ", 1)[0] == chosen.rsplit(" ", 1)[0]
    assert 0.3 < off_topic / len(train + validation) < 0.7
    lengths = [len(tokenizer.apply_chat_template(row["context"], tokenize=True)["input_ids"]) for row in train]
    assert sum(n > 256 for n in lengths) >= len(train) // 5
    assert max(lengths) < 1024
