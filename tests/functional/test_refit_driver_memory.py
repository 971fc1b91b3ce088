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
from pathlib import Path

import psutil
import pytest

from tests.helpers import local_ray, sft_config

pytestmark = [pytest.mark.functional, pytest.mark.slow]

REFIT_BUCKET_BYTES = 64 * 2**20  # ~7 buckets for this model
# The driver may allocate bookkeeping (refs, names, Ray's generator state); a copy of the model would be 400 MB.
MAX_DRIVER_GROWTH_FRACTION = 0.05


def _build_model(out_dir: Path) -> tuple[Path, int]:
    """A Qwen2 of ~100M parameters with the tiny model's tokenizer and window (nothing downloaded)."""
    from nemo_rl.models.tiny_model import build_tokenizer, save_initialized, tiny_qwen2_config

    tokenizer = build_tokenizer()
    config = tiny_qwen2_config(tokenizer, num_hidden_layers=9)
    config.update(
        {
            "hidden_size": 1024,
            "intermediate_size": 2816,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "head_dim": 128,
        }
    )
    save_initialized(config, tokenizer, out_dir, seed=0)
    num_bytes = sum(f.stat().st_size for f in out_dir.glob("*.safetensors"))
    return out_dir, num_bytes


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
    import ray

    from nemo_rl.distributed.virtual_cluster import RayVirtualCluster
    from nemo_rl.models.generation.vllm_worker import VllmGenerationWorker
    from nemo_rl.models.generation.weight_sync import WeightSync
    from nemo_rl.models.policy.lm_policy import Policy

    model_dir, model_bytes = _build_model(tmp_path / "qwen2-100m")
    assert 350e6 < model_bytes < 450e6  # ~100M float32 parameters
    # The model's own window and one short sequence at a time: the engine's start-up profiling stays small.
    cfg = sft_config(
        f"policy.model_name={model_dir}", "~policy.hf_config_overrides", "policy.max_total_sequence_length=256"
    )
    with local_ray(2, tmp_path / "mcore"):
        # Started first, so vLLM's start-up overlaps the policy's checkpoint conversion.
        engine = (
            ray.remote(VllmGenerationWorker)
            .options(num_cpus=0)
            .remote(cfg.policy, str(model_dir), {"max_num_seqs": 1, "max_num_batched_tokens": 256})
        )
        cluster = RayVirtualCluster(1)
        policy = Policy(cluster, cfg.policy, model_dir, seed=0, trainable=False)
        try:
            ray.get(engine.__ray_ready__.remote())
            sync = WeightSync([engine], REFIT_BUCKET_BYTES)
            start = time.perf_counter()
            with _PeakRss() as rss:
                sent = sync.refit(policy)
            seconds = time.perf_counter() - start
            growth = rss.peak - rss.before
            print(f"refit of {model_bytes / 1e6:.0f} MB: {seconds:.1f} s, driver RSS growth {growth / 1e6:.1f} MB")
            assert sent == 9 * 12 + 2  # 12 HF tensors per layer, embedding and final norm (lm_head is tied)
            assert growth < MAX_DRIVER_GROWTH_FRACTION * model_bytes
        finally:
            ray.get(engine.shutdown.remote())
            ray.kill(engine)
            policy.shutdown()
            cluster.shutdown()
