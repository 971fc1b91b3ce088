"""A deterministic, resumable loader of global batches, shared by every algorithm.

A run resumed from a checkpoint must see exactly the batches the uninterrupted
run would have seen, or resuming silently changes the experiment. So the order
of an epoch depends only on (seed, epoch) and the loader's state is just
(epoch, batch index): nothing about the data stream has to be saved, and the
same loader serves SFT samples, GRPO prompts or anything else held in a sequence.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Generic, TypeVar

import numpy as np

T = TypeVar("T")


class ResumableDataloader(Generic[T]):
    """Endless iterator over global batches (lists of items), epoch after epoch, dropping the last partial batch.

    ``epoch`` counts completed passes: it advances right after the last batch of
    an epoch is handed out, so ``epoch < max_epochs`` stops a loop at a clean boundary.
    """

    def __init__(self, dataset: Sequence[T], global_batch_size: int, shuffle: bool, seed: int):
        if len(dataset) < global_batch_size:
            raise ValueError(f"dataset has {len(dataset)} items, fewer than one global batch of {global_batch_size}")
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.batches_per_epoch = len(dataset) // global_batch_size
        self.epoch = 0
        self.batch_index = 0  # batches already handed out in the current epoch

    def _order(self, epoch: int) -> np.ndarray:
        """Item order of ``epoch``: a function of (seed, epoch) only, so it can be recomputed on resume."""
        if not self.shuffle:
            return np.arange(len(self.dataset))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))

    def next_batch(self) -> list[T]:
        start = self.batch_index * self.global_batch_size
        indices = self._order(self.epoch)[start : start + self.global_batch_size]
        self.batch_index += 1
        if self.batch_index == self.batches_per_epoch:
            self.epoch += 1
            self.batch_index = 0
        return [self.dataset[int(i)] for i in indices]

    def __iter__(self) -> Iterator[list[T]]:
        return self

    def __next__(self) -> list[T]:
        return self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """Position plus what it is relative to, so a resume under a different data setup fails loudly."""
        return {
            "epoch": self.epoch,
            "batch_index": self.batch_index,
            "num_samples": len(self.dataset),
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = (len(self.dataset), self.global_batch_size)
        if (state["num_samples"], state["global_batch_size"]) != expected:
            raise ValueError(
                f"dataloader state was saved for {state['num_samples']} items in batches of {state['global_batch_size']}, "
                f"but this run has {expected[0]} in batches of {expected[1]}: the resumed batches would differ"
            )
        self.epoch = int(state["epoch"])
        self.batch_index = int(state["batch_index"])
