"""SFT data pipeline: assistant-only loss mask, truncation, collation, and an exactly resumable loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from nemo_rl.data.builtin_assets import resolve_dataset_paths
from nemo_rl.data.sft_dataset import SFTDataloader, SFTSample, collate, load_sft_dataset
from nemo_rl.models.tiny_model import create_tiny_model


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


def _ids(batch: list[SFTSample]) -> list[int]:
    return [sample.input_ids[0] for sample in batch]


DATA = [SFTSample([i], [1]) for i in range(10)]  # 3 batches of 3 per epoch, one sample dropped


def test_dataloader_is_deterministic_drops_the_last_batch_and_reshuffles_each_epoch():
    loader = SFTDataloader(DATA, 3, shuffle=True, seed=7)
    epochs = [[_ids(loader.next_batch()) for _ in range(3)] for _ in range(3)]
    assert loader.epoch == 3
    for epoch in epochs:
        flat = sum(epoch, [])
        assert len(flat) == len(set(flat)) == 9
    assert epochs[0] != epochs[1]
    again = SFTDataloader(DATA, 3, shuffle=True, seed=7)
    assert [_ids(b) for b, _ in zip(again, range(9))] == sum(epochs, [])
    assert _ids(SFTDataloader(DATA, 3, shuffle=True, seed=8).next_batch()) != epochs[0][0]
    assert [_ids(b) for b, _ in zip(SFTDataloader(DATA, 3, shuffle=False, seed=7), range(3))] == [
        [0, 1, 2],
        [3, 4, 5],
        [6, 7, 8],
    ]


def test_epoch_advances_right_after_the_last_batch():
    loader = SFTDataloader(DATA, 3, shuffle=True, seed=0)
    for _ in range(2):
        loader.next_batch()
    assert loader.epoch == 0
    loader.next_batch()
    assert loader.epoch == 1 and loader.state_dict()["batch_index"] == 0


@pytest.mark.parametrize("stop_after", [1, 3, 4, 5])  # mid-epoch, at the boundary, just after it, mid second epoch
def test_resume_sees_exactly_the_uninterrupted_batches(stop_after):
    reference = [_ids(b) for b, _ in zip(SFTDataloader(DATA, 3, shuffle=True, seed=3), range(9))]
    first = SFTDataloader(DATA, 3, shuffle=True, seed=3)
    seen = [_ids(first.next_batch()) for _ in range(stop_after)]
    state = json.loads(json.dumps(first.state_dict()))  # as stored in a checkpoint
    resumed = SFTDataloader(DATA, 3, shuffle=True, seed=3)
    resumed.load_state_dict(state)
    assert resumed.epoch == first.epoch
    seen += [_ids(resumed.next_batch()) for _ in range(9 - stop_after)]
    assert seen == reference


def test_dataloader_rejects_mismatched_state_and_tiny_datasets():
    state = SFTDataloader(DATA, 3, shuffle=True, seed=0).state_dict()
    with pytest.raises(ValueError, match="resumed batches would differ"):
        SFTDataloader(DATA, 2, shuffle=True, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        SFTDataloader(DATA[:2], 3, shuffle=True, seed=0)
