"""The resumable loader: deterministic epochs, a dropped last partial batch, and exact resumption."""

from __future__ import annotations

import json

import pytest

from nemo_rl.data.dataloader import ResumableDataloader


def _ids(batch: list[list[int]]) -> list[int]:
    return [item[0] for item in batch]


DATA = [[i] for i in range(10)]  # 3 batches of 3 per epoch, one item dropped


def test_dataloader_is_deterministic_drops_the_last_batch_and_reshuffles_each_epoch():
    loader = ResumableDataloader(DATA, 3, shuffle=True, seed=7)
    epochs = [[_ids(loader.next_batch()) for _ in range(3)] for _ in range(3)]
    assert loader.epoch == 3
    for epoch in epochs:
        flat = sum(epoch, [])
        assert len(flat) == len(set(flat)) == 9
    assert epochs[0] != epochs[1]
    again = ResumableDataloader(DATA, 3, shuffle=True, seed=7)
    assert [_ids(b) for b, _ in zip(again, range(9))] == sum(epochs, [])
    assert _ids(ResumableDataloader(DATA, 3, shuffle=True, seed=8).next_batch()) != epochs[0][0]
    assert [_ids(b) for b, _ in zip(ResumableDataloader(DATA, 3, shuffle=False, seed=7), range(3))] == [
        [0, 1, 2],
        [3, 4, 5],
        [6, 7, 8],
    ]


def test_epoch_advances_right_after_the_last_batch():
    loader = ResumableDataloader(DATA, 3, shuffle=True, seed=0)
    for _ in range(2):
        loader.next_batch()
    assert loader.epoch == 0
    loader.next_batch()
    assert loader.epoch == 1 and loader.state_dict()["batch_index"] == 0


@pytest.mark.parametrize("stop_after", [1, 3, 4, 5])  # mid-epoch, at the boundary, just after it, mid second epoch
def test_resume_sees_exactly_the_uninterrupted_batches(stop_after):
    reference = [_ids(b) for b, _ in zip(ResumableDataloader(DATA, 3, shuffle=True, seed=3), range(9))]
    first = ResumableDataloader(DATA, 3, shuffle=True, seed=3)
    seen = [_ids(first.next_batch()) for _ in range(stop_after)]
    state = json.loads(json.dumps(first.state_dict()))  # as stored in a checkpoint
    resumed = ResumableDataloader(DATA, 3, shuffle=True, seed=3)
    resumed.load_state_dict(state)
    assert resumed.epoch == first.epoch
    seen += [_ids(resumed.next_batch()) for _ in range(9 - stop_after)]
    assert seen == reference


def test_dataloader_rejects_mismatched_state_and_tiny_datasets():
    state = ResumableDataloader(DATA, 3, shuffle=True, seed=0).state_dict()
    with pytest.raises(ValueError, match="resumed batches would differ"):
        ResumableDataloader(DATA, 2, shuffle=True, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ResumableDataloader(DATA[:2], 3, shuffle=True, seed=0)
