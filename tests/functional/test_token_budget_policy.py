"""Token-budget batching through the whole ``Policy`` on two data-parallel Megatron ranks (Ray, gloo).

The two shards get different numbers of micro-batches (the first holds the
long rows: four micro-batches of one row; the second's short rows fit one),
and megatron-core's DDP takes that as it is: gradients are reduced once per
step, in ``finalize_model_grads``, whatever each rank's count. The step's loss
totals and the gathered gradients equal those of fixed micro-batches of two
rows, for SFT's NLL and GRPO's sequence-level clipped loss, and the log-probs
come back in row order at the batch's length, equal on every real token.
"""

from __future__ import annotations

import pytest
import torch

from nemo_rl.algorithms.advantages import token_weights
from nemo_rl.algorithms.loss_functions import ClippedPGLoss, NLLLoss
from nemo_rl.models.policy.micro_batches import MICRO_BATCHES, UTILISATION
from tests.helpers import local_ray, running_policy, sft_config

pytestmark = [pytest.mark.functional, pytest.mark.slow]

LENGTHS = (256, 200, 150, 120, 40, 64, 16, 30)  # DP rank 0 takes the first four rows, rank 1 the rest
GRAD_ATOL = 1e-7


def _config(dynamic: bool):
    return sft_config(
        "cluster.gpus_per_node=2",
        "~policy.hf_config_overrides",
        "policy.max_total_sequence_length=256",  # the tiny model's own window
        "policy.max_grad_norm=1e9",  # no clipping: the gradients compared are the raw ones
        "policy.train_micro_batch_size=2",
        "sft.val_micro_batch_size=2",
        f"policy.dynamic_batching.enabled={str(dynamic).lower()}",
        "policy.dynamic_batching.train_mb_tokens=256",  # rank 0: 256 | 200 | 150 | 120; rank 1: 4 x 64
        "policy.dynamic_batching.logprob_mb_tokens=512",  # rank 0: 256, 200 | 150, 120; rank 1: one
        "policy.dynamic_batching.sequence_length_round=8",
    ).policy


def _rows() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    positions = torch.arange(max(LENGTHS))
    lengths = torch.tensor(LENGTHS)
    real = positions < lengths[:, None]
    input_ids = torch.where(real, torch.randint(3, 550, real.shape, generator=generator), 0)
    return {"input_ids": input_ids, "loss_mask": (real & (positions >= 8)).long(), "input_lengths": lengths}


def _grpo_fields(rows: dict[str, torch.Tensor], logprobs: torch.Tensor) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    mask = rows["loss_mask"].float()
    noise = 0.3 * torch.randn(logprobs.shape, generator=generator)
    return {
        "advantages": mask * torch.randn(len(LENGTHS), 1, generator=generator),
        "prev_logprobs": (logprobs + noise) * mask,
        "reference_logprobs": (logprobs - noise) * mask,
        "token_weight": token_weights(rows["loss_mask"], sequence_level=True),
    }


def _run(policy, start, rows: dict[str, torch.Tensor], grpo_rows: dict[str, torch.Tensor]) -> dict:
    """Log-probs, then an NLL and a clipped-loss step, each from the weights saved in ``start``."""
    policy.load_checkpoint(start)
    out = {"logprobs": policy.get_logprobs(rows, micro_batch_size=2)}
    for name, loss_fn, batch in (
        ("nll", NLLLoss(), rows),
        ("pg_sequence", ClippedPGLoss(reference_policy_kl_penalty=0.1), grpo_rows),
    ):
        policy.load_checkpoint(start)
        out[name] = policy.train(batch, loss_fn, micro_batch_size=2)
        out[f"{name}_grads"] = policy.gathered_state("grads")
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[bool, dict]:
    """Both layouts on one policy: token-budget batching is the driver's split alone (the workers take any
    list of micro-batches), so the same workers run both, from the same saved weights."""
    rows, start = _rows(), tmp_path_factory.mktemp("start")
    with local_ray(2, tmp_path_factory.mktemp("mcore")), running_policy(_config(False), workers=2) as policy:
        grpo_rows = rows | _grpo_fields(rows, policy.get_logprobs(rows, micro_batch_size=2))
        policy.train(rows, NLLLoss(), micro_batch_size=2)  # megatron-core has optimizer state to save after a step
        policy.save_checkpoint(start)
        fixed = _run(policy, start, rows, grpo_rows)
        policy.cfg = _config(True)
        return {False: fixed, True: _run(policy, start, rows, grpo_rows)}


def test_logprobs_come_back_in_row_order_equal_on_every_real_token(runs):
    fixed, budget = runs[False]["logprobs"], runs[True]["logprobs"]
    real = torch.arange(max(LENGTHS)) < torch.tensor(LENGTHS)[:, None]
    assert budget.shape == fixed.shape == real.shape
    assert (budget[real] - fixed[real]).abs().max() <= 1e-6


@pytest.mark.parametrize("loss", ["nll", "pg_sequence"])
def test_steps_with_different_micro_batch_counts_per_rank_equal_fixed_micro_batches(runs, loss):
    fixed, budget = runs[False][loss], runs[True][loss]
    assert budget[MICRO_BATCHES] == 5.0  # four on rank 0, one on rank 1
    assert budget[UTILISATION] == pytest.approx(sum(LENGTHS) / (5 * 256))
    assert MICRO_BATCHES not in fixed and UTILISATION not in fixed
    for key, value in fixed["metrics"].items():
        assert budget["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-5), key
    assert budget["grad_norm"] == pytest.approx(fixed["grad_norm"], rel=1e-5)
    fixed_grads, budget_grads = runs[False][f"{loss}_grads"], runs[True][f"{loss}_grads"]
    for name, grad in fixed_grads.items():
        torch.testing.assert_close(budget_grads[name], grad, rtol=1e-5, atol=GRAD_ATOL, msg=name)
    assert max(grad.abs().max() for grad in fixed_grads.values()) > 1e-3
