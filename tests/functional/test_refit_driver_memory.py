"""A refit does not pass the model through the driver: its memory stays flat while a ~100M-parameter model moves.

The policy workers put their buckets into the object store and the engine
fetches them from there (``weight_sync``); the driver only forwards refs. Its
resident memory is sampled throughout one refit of a random-weight Qwen2 of
about 100M parameters (400 MB in float32) and must grow by far less than the
model. The policy is forward-only (no optimizer state) to keep the test small.
"""

from __future__ import annotations

import threading
import time

import psutil
import pytest

from tests.helpers import build_qwen2_100m, refit_pair

pytestmark = [pytest.mark.functional, pytest.mark.slow]

REFIT_BUCKET_BYTES = 64 * 2**20  # ~7 buckets for this model
# The driver may allocate bookkeeping (refs, names, Ray's generator state); a copy of the model would be 400 MB.
MAX_DRIVER_GROWTH_FRACTION = 0.05


class _PeakRss:
    """The process's resident set size, sampled in a thread while the block runs."""

    def __init__(self, period_s: float = 0.005) -> None:
        self.process = psutil.Process()
        self.period_s = period_s
        self.peak = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.period_s)

    def __enter__(self) -> _PeakRss:
        self.before = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def test_refit_of_a_100m_model_leaves_the_driver_memory_flat(tmp_path):
    from nemo_rl.models.generation.weight_sync import WeightSync

    model_dir, model_bytes = build_qwen2_100m(tmp_path / "qwen2-100m")
    assert 350e6 < model_bytes < 450e6  # ~100M float32 parameters
    with refit_pair(model_dir, tmp_path / "mcore") as (policy, engine):
        sync = WeightSync([engine], REFIT_BUCKET_BYTES)
        start = time.perf_counter()
        with _PeakRss() as rss:
            sent = sync.refit(policy)
        seconds = time.perf_counter() - start
        growth = rss.peak - rss.before
        print(f"refit of {model_bytes / 1e6:.0f} MB: {seconds:.1f} s, driver RSS growth {growth / 1e6:.1f} MB")
        assert sent == 9 * 12 + 2  # 12 HF tensors per layer, embedding and final norm (lm_head is tied)
        assert growth < MAX_DRIVER_GROWTH_FRACTION * model_bytes
