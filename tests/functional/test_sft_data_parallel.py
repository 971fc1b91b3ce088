"""Two Megatron workers (data parallel over gloo) compute the same training run as one.

The two-worker run uses the distributed optimizer (the configs' default): it
must also match the plain optimizer on two workers, and its checkpoint must
resume into the run it would have been.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from nemo_rl.models.megatron.parallel_weights import read_checkpoint_model_shards
from tests.functional.test_sft_megatron_yarn import _losses, _train, ray_local  # noqa: F401  (fixture)

pytestmark = [pytest.mark.functional, pytest.mark.slow]

COMMON = ("sft.max_num_steps=3", "sft.val_period=0", "sft.export_hf_dir=null")
DP2 = "cluster.gpus_per_node=2"
# Step 2's checkpoint is resumed; the final step's holds the trained weights.
CHECKPOINTS = "checkpointing.save_period=2"


def _final_weights(run_dir) -> dict[str, torch.Tensor]:
    return read_checkpoint_model_shards(run_dir / "ckpt" / "step_3")[(0, 0)]


def _assert_same_losses_and_weights(got_dir, want_dir) -> None:
    """The losses logged by both runs and their final weights, equal to float32 rounding (1e-6 relative)."""
    got_losses, want_losses = _losses(got_dir), _losses(want_dir)
    assert set(got_losses) <= set(want_losses)
    torch.testing.assert_close(
        torch.tensor(list(got_losses.values())),
        torch.tensor([want_losses[s] for s in got_losses]),
        rtol=1e-6,
        atol=0,
    )
    got, want = _final_weights(got_dir), _final_weights(want_dir)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


def test_dp2_equals_single_worker(ray_local, tmp_path):  # noqa: F811
    single = _train(tmp_path / "dp1", *COMMON, "checkpointing.enabled=false")
    double = _train(tmp_path / "dp2", *COMMON, DP2, CHECKPOINTS)
    assert single.final_step == double.final_step == 3
    # Global-batch normalisation makes the split irrelevant; gradients are summed by megatron DDP (gloo).
    torch.testing.assert_close(
        torch.tensor(list(_losses(tmp_path / "dp2").values())),
        torch.tensor(list(_losses(tmp_path / "dp1").values())),
        rtol=1e-5,
        atol=1e-5,
    )
    assert sorted(p.name for p in (tmp_path / "dp2" / "ckpt" / "step_2").glob("optimizer_*.pt")) == [
        "optimizer_tp00_pp00_dp000.pt",
        "optimizer_tp00_pp00_dp001.pt",
    ], "each distributed optimizer rank saves its shard"

    # The distributed optimizer (reduce-scatter, sharded Adam, all-gather) computes what the plain one does.
    plain = tmp_path / "dp2_plain_optimizer"
    _train(plain, *COMMON, DP2, CHECKPOINTS, "policy.megatron_cfg.optimizer.use_distributed_optimizer=false")
    assert sorted(_losses(plain)) == [1, 2, 3]
    _assert_same_losses_and_weights(plain, tmp_path / "dp2")

    # Step 2's checkpoint, resumed, takes step 3 as the uninterrupted run did.
    resumed = tmp_path / "dp2_resumed"
    shutil.copytree(tmp_path / "dp2" / "ckpt" / "step_2", resumed / "ckpt" / "step_2")
    assert _train(resumed, *COMMON, DP2, CHECKPOINTS).final_step == 3
    assert list(_losses(resumed)) == [3]
    _assert_same_losses_and_weights(resumed, tmp_path / "dp2")
