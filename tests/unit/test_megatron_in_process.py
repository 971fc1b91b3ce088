"""The Megatron policy worker as an object of the test's own process (no Ray): what ``tools/gpu_check.py`` drives."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import WITHOUT_RAY_OR_VLLM, sft_config

ROOT = Path(__file__).resolve().parents[2]


def test_the_worker_and_its_config_import_without_ray_or_vllm():
    """The whole of tools/gpu_check.py runs without them in tests/functional/test_gpu_check.py (slow)."""
    modules = ("nemo_rl.models.policy.megatron_policy_worker", "nemo_rl.config.loader", "nemo_rl.config.schema")
    code = f"{WITHOUT_RAY_OR_VLLM}; " + "; ".join(f"import {m}" for m in modules)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture
def no_distributed_world():
    """The in-process worker makes torch.distributed's world itself: a world another test left is ended first."""
    from nemo_rl.models.policy.megatron_policy_worker import end_distributed_world

    end_distributed_world()


def test_in_process_worker_computes_hf_logits_trains_and_makes_room_for_the_next(no_distributed_world, tmp_path):
    from transformers import AutoModelForCausalLM

    from nemo_rl.algorithms.loss_functions import NLLLoss
    from nemo_rl.models.builtin_models import resolve_model_path
    from nemo_rl.models.megatron.cpu_compat import _CudaToCpuMode
    from nemo_rl.models.policy.loss_metrics import logged_metrics
    from nemo_rl.models.policy.megatron_policy_worker import MegatronPolicyWorker

    cfg = sft_config("policy.train_global_batch_size=1", "policy.train_micro_batch_size=1").policy
    path = resolve_model_path(cfg.model_name)
    ids = torch.randint(3, 500, (1, 1024), generator=torch.Generator().manual_seed(0))  # 4x the 256-token window
    worker = MegatronPolicyWorker.in_process(cfg, path, seed=0)
    try:
        got = worker.get_logits(ids)
        # transformers' model of the same weights under the converted checkpoint's config (the YaRN block applied)
        hf = AutoModelForCausalLM.from_pretrained(path, config=worker.hf_config, dtype=torch.float32).eval()
        assert hf.config.rope_parameters["rope_type"] == "yarn"
        with torch.no_grad():
            expected = hf(ids).logits
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)  # float32, different op order

        modes = []
        worker.model.register_forward_hook(lambda *_: modes.append(torch.overrides._get_current_function_mode()))
        result = worker.train_step([{"input_ids": ids, "loss_mask": torch.ones_like(ids)}], NLLLoss())
        # on CPU the model's forward runs with the compatibility layer's device redirect paused
        assert modes and not any(isinstance(mode, _CudaToCpuMode) for mode in modes)
        loss = logged_metrics(result["metrics"], NLLLoss())["loss"]
        assert math.isfinite(loss) and math.isfinite(result["grad_norm"]) and result["update_successful"]
        trained = worker.get_logits(ids)
        worker.save_checkpoint(str(tmp_path))
    finally:
        worker.shutdown()
    assert not torch.distributed.is_initialized()

    again = MegatronPolicyWorker.in_process(cfg, path, seed=0, trainable=False)
    try:
        assert not again.converted_now, "the second worker reuses the first one's conversion"
        torch.testing.assert_close(again.get_logits(ids), got, rtol=0, atol=0)  # the first worker's update is its own
        # A forward-only worker takes a training checkpoint's weights (and leaves its optimizer shards unread).
        again.load_checkpoint(str(tmp_path))
        torch.testing.assert_close(again.get_logits(ids), trained, rtol=0, atol=0)
    finally:
        again.shutdown()
