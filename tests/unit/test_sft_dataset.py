"""SFT data pipeline: assistant-only loss mask, truncation, collation, and Parquet input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from nemo_rl.data.builtin_datasets import resolve_dataset_paths
from nemo_rl.data.sft_dataset import SFTSample, collate, load_sft_dataset
from nemo_rl.models.tiny_model import create_tiny_model
from nemo_rl.utils.errors import DataError


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(create_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-qwen2"))


@pytest.fixture(autouse=True)
def cache(monkeypatch, tmp_path) -> Path:
    monkeypatch.setenv("NEMO_RL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _write_jsonl(path: Path, conversations: list[list[dict[str, str]]]) -> Path:
    path.write_text("".join(json.dumps({"messages": messages}) + "\n" for messages in conversations))
    return path


def _chat(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def test_loss_mask_is_on_assistant_tokens_only(tokenizer, tmp_path):
    path = _write_jsonl(
        tmp_path / "d.jsonl",
        [_chat("What is 4 + 4?", "4 + 4 = 8"), _chat("Repeat these words exactly:\nsun moon", "sun moon")],
    )
    data = load_sft_dataset(path, tokenizer, max_seq_len=1024)
    assert (len(data), data.num_truncated, data.num_dropped) == (2, 0, 0)
    for sample, answer, prompt in zip(
        data, ["4 + 4 = 8", "sun moon"], ["What is 4 + 4?", "Repeat these words exactly:\nsun moon"]
    ):
        trained = [t for t, m in zip(sample.input_ids, sample.loss_mask) if m]
        untrained = [t for t, m in zip(sample.input_ids, sample.loss_mask) if not m]
        assert tokenizer.decode(trained) == answer + "<|im_end|>"
        assert tokenizer.decode(untrained) == f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n\n"


def test_long_samples_are_truncated_and_samples_without_reply_dropped(tokenizer, tmp_path):
    long_answer = " ".join(["red"] * 50)
    path = _write_jsonl(
        tmp_path / "d.jsonl", [_chat("Hi", long_answer), _chat(" ".join(["blue"] * 60), "ok"), _chat("Hi", "ok")]
    )
    data = load_sft_dataset(path, tokenizer, max_seq_len=32)
    assert (len(data), data.num_truncated, data.num_dropped) == (2, 2, 1)
    assert len(data[0].input_ids) == len(data[0].loss_mask) == 32
    assert data[0].loss_mask[-1] == 1  # the truncated reply is still trained on
    assert len(data[1].input_ids) < 32


def test_a_template_without_generation_blocks_is_reported(tokenizer, tmp_path):
    plain = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    path = _write_jsonl(tmp_path / "d.jsonl", [_chat("Hi", "ok")])
    with pytest.raises(ValueError, match="generation"):
        load_sft_dataset(path, plain, max_seq_len=64)


def test_builtin_data_fits_the_training_length_but_not_the_original_window(tokenizer):
    train, _ = resolve_dataset_paths("tiny-chat", None, None)
    full = load_sft_dataset(train, tokenizer, max_seq_len=1024)
    assert (len(full), full.num_truncated, full.num_dropped) == (400, 0, 0)
    window = load_sft_dataset(train, tokenizer, max_seq_len=256)
    assert window.num_truncated > 100 and window.num_dropped > 0  # recall answers sit past the window


def test_collate_pads_to_a_multiple_and_masks_padding():
    samples = [SFTSample([5, 6, 7], [0, 1, 1]), SFTSample([8] * 10, [0] * 5 + [1] * 5)]
    batch = collate(samples, pad_id=0, divisible_by=8)
    assert batch["input_ids"].shape == batch["loss_mask"].shape == (2, 16)
    assert batch["input_lengths"].tolist() == [3, 10]
    assert batch["input_ids"][0].tolist() == [5, 6, 7] + [0] * 13
    assert batch["loss_mask"][0].tolist() == [0, 1, 1] + [0] * 13
    assert batch["loss_mask"][1, 10:].sum() == 0 and batch["loss_mask"][1].sum() == 5
    assert collate(samples, pad_id=3, divisible_by=5)["input_ids"].shape == (2, 10)
    assert all(t.dtype == torch.long for t in batch.values())


def test_parquet_rows_load_like_jsonl_and_bad_rows_name_their_number(tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    conversations = [_chat("What is 4 + 4?", "4 + 4 = 8"), _chat("Hi", "ok")]
    jsonl = load_sft_dataset(_write_jsonl(tmp_path / "d.jsonl", conversations), tokenizer, max_seq_len=1024)
    pq.write_table(pa.Table.from_pylist([{"messages": m} for m in conversations]), tmp_path / "d.parquet")
    parquet = load_sft_dataset(tmp_path / "d.parquet", tokenizer, max_seq_len=1024)
    assert parquet.samples == jsonl.samples
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": conversations[0]}) + "\n" + json.dumps({"text": "hi"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl: row 2: no 'messages' \(the row has 'text'\); write each row as"):
        load_sft_dataset(bad, tokenizer, max_seq_len=1024)
