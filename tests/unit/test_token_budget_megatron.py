"""Token-budget micro-batches on the real Megatron worker (in process, DP 1) compute what fixed ones compute.

The same rows of varied lengths, in fixed micro-batches of 2 padded to the
batch's length, then in token-budget micro-batches (``split_by_budget``: three
of different shapes, longest first, each trimmed to its longest row): the loss
totals and the gradients of one ``train_step`` from the same weights agree to
float32 rounding, for SFT's NLL and GRPO's clipped loss at token and sequence
level; the log-probs, put back in row order, agree to 1e-6 on every real
token (measured: 4.8e-7); and DPO's loss, its pairs kept whole, is the same. ``tests/functional/test_token_budget_policy.py`` runs the whole
``Policy`` with two data-parallel ranks that get different numbers of
micro-batches.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nemo_rl.algorithms.advantages import token_weights
from nemo_rl.algorithms.loss_functions import ClippedPGLoss, DPOLoss, NLLLoss
from nemo_rl.models.policy.interfaces import LossFunction
from nemo_rl.models.policy.micro_batches import split_by_budget, split_fixed
from tests.helpers import sft_config

LENGTHS = (256, 40, 120, 64, 200, 16, 90, 150)
BUDGET, ROUND = 512, 8  # groups [256, 200] at 256, [150, 120, 90] at 152, [64, 40, 16] at 64
GRAD_ATOL = 1e-7  # measured: 8e-9, of gradients up to 4e-2
LOSSES = {
    "nll": NLLLoss(),
    "pg_token": ClippedPGLoss(reference_policy_kl_penalty=0.1),
    "pg_sequence": ClippedPGLoss(reference_policy_kl_penalty=0.1),
}


def _rows() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    width = max(LENGTHS)
    positions = torch.arange(width)
    lengths = torch.tensor(LENGTHS)
    real = positions < lengths[:, None]
    input_ids = torch.where(real, torch.randint(3, 550, (len(LENGTHS), width), generator=generator), 0)
    loss_mask = (real & (positions >= 8)).long()  # an 8-token prompt, the rest a response
    return {"input_ids": input_ids, "loss_mask": loss_mask, "input_lengths": lengths}


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    from nemo_rl.models.builtin_models import resolve_model_path
    from nemo_rl.models.policy.megatron_policy_worker import MegatronPolicyWorker, end_distributed_world

    end_distributed_world()  # a world another test left
    cfg = sft_config("policy.max_grad_norm=1e9").policy  # no clipping: the gradients compared are the raw ones
    worker = MegatronPolicyWorker.in_process(cfg, resolve_model_path(cfg.model_name), seed=0)
    yield worker
    worker.shutdown()


@pytest.fixture(scope="module")
def start(worker, tmp_path_factory) -> Path:
    """The weights (and optimizer state) every train step below starts from: after one step, since
    megatron-core's optimizer state has nothing to save before its first."""
    worker.train_step(_fixed(_rows()), NLLLoss())
    directory = tmp_path_factory.mktemp("start")
    worker.save_checkpoint(str(directory))
    return directory


def _fixed(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    return split_fixed(batch, 2, None).micro_batches


def test_the_budget_split_is_three_micro_batches_of_different_shapes():
    split = split_by_budget(_rows(), BUDGET, ROUND)
    assert [tuple(mb["input_ids"].shape) for mb in split.micro_batches] == [(2, 256), (3, 152), (3, 64)]


def test_logprobs_equal_the_fixed_micro_batches_in_row_order(worker):
    rows = _rows()
    fields = {"input_ids": rows["input_ids"], "input_lengths": rows["input_lengths"]}
    fixed = worker.get_logprobs(_fixed({"input_ids": rows["input_ids"]}))
    split = split_by_budget(fields, BUDGET, ROUND)
    budget = split.restore(worker.get_logprobs(split.micro_batches))
    real = torch.arange(rows["input_ids"].shape[1]) < rows["input_lengths"][:, None]
    assert budget.shape == fixed.shape
    assert (budget[real] - fixed[real]).abs().max() <= 1e-6
    assert (budget[~real] == 0).sum() > 0  # past a micro-batch's own length only zeros come back


def test_trimmed_fixed_micro_batches_give_the_untrimmed_logprobs_and_step(worker, start):
    """What ``Policy`` sends with fixed micro-batches: each trimmed to its own longest row (pairs of rows 256 and
    40, 120 and 64, 200 and 16, 90 and 150, rounded up to 8)."""
    rows = _rows()
    fields = {"input_ids": rows["input_ids"], "input_lengths": rows["input_lengths"]}
    fixed = worker.get_logprobs(_fixed({"input_ids": rows["input_ids"]}))
    split = split_fixed(fields, 2, ROUND)
    assert [mb["input_ids"].shape[1] for mb in split.micro_batches] == [256, 120, 200, 152]
    trimmed = split.restore(worker.get_logprobs(split.micro_batches))
    real = torch.arange(rows["input_ids"].shape[1]) < rows["input_lengths"][:, None]
    assert (trimmed[real] - fixed[real]).abs().max() <= 1e-6
    full, full_grads = _step(worker, start, _fixed(rows), NLLLoss())
    cut, cut_grads = _step(worker, start, split_fixed(rows, 2, ROUND).micro_batches, NLLLoss())
    assert cut["metrics"]["nll_sum"] == pytest.approx(full["metrics"]["nll_sum"], rel=1e-6)
    for name, grad in full_grads.items():
        torch.testing.assert_close(cut_grads[name], grad, rtol=1e-5, atol=GRAD_ATOL, msg=name)


def test_topk_logprobs_equal_the_fixed_micro_batches_in_row_order(worker):
    """A tuple of outputs (a distillation teacher's values and vocab ids) is put back element-wise."""
    rows = _rows()
    fields = {"input_ids": rows["input_ids"], "input_lengths": rows["input_lengths"]}
    fixed_values, fixed_ids = worker.get_topk_logprobs(_fixed({"input_ids": rows["input_ids"]}), 4)
    split = split_by_budget(fields, BUDGET, ROUND)
    values, ids = split.restore(worker.get_topk_logprobs(split.micro_batches, 4))
    real = torch.arange(rows["input_ids"].shape[1]) < rows["input_lengths"][:, None]
    assert values.shape == fixed_values.shape == (len(LENGTHS), max(LENGTHS), 4)
    assert (values[real] - fixed_values[real]).abs().max() <= 1e-6
    assert torch.equal(ids[real], fixed_ids[real])


def _grpo_rows(worker, start: Path, sequence_level: bool) -> dict[str, torch.Tensor]:
    """The rows with GRPO's per-token fields: per-row advantages, and old / reference log-probs near the
    starting policy's so that some ratios clip and the KL term is not zero."""
    worker.load_checkpoint(str(start))
    rows = _rows()
    generator = torch.Generator().manual_seed(1)
    mask = rows["loss_mask"].float()
    current = worker.get_logprobs(_fixed({"input_ids": rows["input_ids"]}))
    noise = 0.3 * torch.randn(current.shape, generator=generator)
    return rows | {
        "advantages": mask * torch.randn(len(LENGTHS), 1, generator=generator),
        "prev_logprobs": (current + noise) * mask,
        "reference_logprobs": (current - noise) * mask,
        "token_weight": token_weights(rows["loss_mask"], sequence_level),
    }


def _step(worker, start: Path, microbatches: list[dict[str, torch.Tensor]], loss_fn: LossFunction) -> tuple[dict, dict]:
    worker.load_checkpoint(str(start))
    result = worker.train_step(microbatches, loss_fn)
    return result, worker.gathered_state("grads")


@pytest.mark.parametrize("loss", list(LOSSES))
def test_a_train_step_equals_the_fixed_micro_batches(worker, start, loss):
    rows = _rows() if loss == "nll" else _grpo_rows(worker, start, sequence_level=loss == "pg_sequence")
    loss_fn = LOSSES[loss]
    fixed, fixed_grads = _step(worker, start, _fixed(rows), loss_fn)
    budget, budget_grads = _step(worker, start, split_by_budget(rows, BUDGET, ROUND).micro_batches, loss_fn)
    assert fixed["metrics"].keys() == budget["metrics"].keys()
    for key, value in fixed["metrics"].items():
        assert budget["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-5), key
    if loss != "nll":
        assert fixed["metrics"]["clipped_tokens"] > 0 and fixed["metrics"]["kl_sum"] > 0
    assert budget["grad_norm"] == pytest.approx(fixed["grad_norm"], rel=1e-5)
    assert fixed_grads.keys() == budget_grads.keys()
    for name, grad in fixed_grads.items():
        torch.testing.assert_close(budget_grads[name], grad, rtol=1e-5, atol=GRAD_ATOL, msg=name)
    assert max(grad.abs().max() for grad in fixed_grads.values()) > 1e-3  # gradients far above the tolerance


def test_preference_pairs_stay_whole_and_dpo_evaluates_the_same(worker, start):
    """Rows alternate chosen, rejected; each pair is one unit of the split, or ``DPOLoss`` would refuse it."""
    worker.load_checkpoint(str(start))
    rows = _rows()
    current = worker.get_logprobs(_fixed({"input_ids": rows["input_ids"]}))
    noise = 0.3 * torch.randn(current.shape, generator=torch.Generator().manual_seed(2))
    rows["reference_logprobs"] = (current + noise) * rows["loss_mask"]
    split = split_by_budget(rows, BUDGET, ROUND, rows_per_unit=2)
    assert split.rows.tolist() == [0, 1, 4, 5, 6, 7, 2, 3]  # pairs of 256, 200, 150 and 120 tokens, one per micro-batch
    loss_fn = DPOLoss(beta=0.1, sft_loss_weight=0.5)
    fixed = worker.evaluate(_fixed(rows), loss_fn)["metrics"]
    budget = worker.evaluate(split.micro_batches, loss_fn)["metrics"]
    assert fixed.keys() == budget.keys()
    for key, value in fixed.items():
        assert budget[key] == pytest.approx(value, rel=1e-5, abs=1e-5), key
