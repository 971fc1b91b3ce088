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

LR = 3e-3  # sft.yaml's peak learning rate
STEPS = 3
COMMON = (f"sft.max_num_steps={STEPS}", "sft.val_period=0", "sft.export_hf_dir=null")
DP2 = "cluster.gpus_per_node=2"
# Step 2's checkpoint is resumed; the final step's holds the trained weights.
CHECKPOINTS = "checkpointing.save_period=2"


def _final_weights(run_dir) -> dict[str, torch.Tensor]:
    """The trained weights under HF names (q, k and v projections apart)."""
    from transformers import AutoConfig

    from nemo_rl.models.megatron.hf_weights import megatron_to_hf

    step = run_dir / "ckpt" / f"step_{STEPS}"
    shard = read_checkpoint_model_shards(step)[(0, 0)]
    return megatron_to_hf({k: v for k, v in shard.items() if v is not None}, AutoConfig.from_pretrained(step))


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
        if name.endswith("k_proj.bias"):
            # Adding a constant to every key leaves each query's softmax unchanged, so these gradients are 0 in exact
            # arithmetic: rounding noise, which Adam normalises to updates of up to lr each step (measured: 6.4e-7).
            assert (got[name] - want[name]).abs().max() <= 2 * LR * STEPS, name
        else:
            diff = float((got[name] - want[name]).norm() / want[name].norm())
            assert diff <= 1e-6, (name, diff)  # measured: <= 8e-8


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
