"""Two Megatron workers (data parallel over gloo) compute the same training run as one."""

from __future__ import annotations

import pytest
import torch

from tests.functional.test_sft_megatron_yarn import _losses, _train, ray_local  # noqa: F401  (fixture)

pytestmark = [pytest.mark.functional, pytest.mark.slow]


def test_dp2_equals_single_worker(ray_local, tmp_path):  # noqa: F811
    common = ("sft.max_num_steps=3", "checkpointing.enabled=false", "sft.val_period=0", "sft.export_hf_dir=null")
    single = _train(tmp_path / "dp1", *common)
    double = _train(tmp_path / "dp2", *common, "cluster.gpus_per_node=2")
    assert single.final_step == double.final_step == 3
    # Global-batch normalisation makes the split irrelevant; gradients are summed by megatron DDP (gloo).
    torch.testing.assert_close(
        torch.tensor(list(_losses(tmp_path / "dp2").values())),
        torch.tensor(list(_losses(tmp_path / "dp1").values())),
        rtol=1e-5,
        atol=1e-5,
    )
