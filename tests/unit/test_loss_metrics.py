"""The losses' metric declarations and the one reducer that turns their parts into the logged metrics.

Parts are sums over a micro-batch's tokens or pairs; they add up over micro-batches,
ranks and optimizer steps, and a mean is taken once, as a ratio of totals. Per-micro-batch
means averaged again would weigh every micro-batch alike, whatever its token count.
"""

from __future__ import annotations

import pytest
import torch

from nemo_rl.algorithms.distillation_loss import DistillationLoss
from nemo_rl.algorithms.loss_functions import BradleyTerryLoss, ClippedPGLoss, DPOLoss, NLLLoss
from nemo_rl.models.policy.interfaces import LossFunction, Metric
from nemo_rl.models.policy.loss_metrics import add_totals, declared_parts, logged_metrics, micro_batch_totals

B, L, V, K = 4, 6, 11, 3


def _mask() -> torch.Tensor:
    mask = torch.ones(B, L)
    mask[0, :2] = 0
    mask[3, 4:] = 0
    return mask


def _logprobs(seed: int) -> torch.Tensor:
    return -torch.rand(B, L, generator=torch.Generator().manual_seed(seed)) * 2


def _teacher(seed: int) -> dict[str, torch.Tensor]:
    logits = torch.randn(B, L, V, generator=torch.Generator().manual_seed(seed))
    values, indices = torch.log_softmax(logits, -1).topk(K, -1)
    return {"teacher_topk_logprobs": values, "teacher_topk_indices": indices}


# Each shipped loss with a model output and a micro-batch carrying every field it reads.
SHIPPED: dict[str, tuple[LossFunction, torch.Tensor, dict[str, torch.Tensor]]] = {
    "nll": (NLLLoss(), _logprobs(0), {"token_mask": _mask()}),
    "clipped_pg": (
        ClippedPGLoss(reference_policy_kl_penalty=0.1),
        _logprobs(0),
        {
            "token_mask": _mask(),
            "advantages": torch.linspace(-1, 1, B * L).reshape(B, L),
            "prev_logprobs": _logprobs(1),
            "reference_logprobs": _logprobs(2),
        },
    ),
    "dpo": (
        DPOLoss(0.1, sft_loss_weight=0.5),
        _logprobs(0),
        {"token_mask": _mask(), "reference_logprobs": _logprobs(1)},
    ),
    "bradley_terry": (BradleyTerryLoss(), torch.randn(B, L), {"input_lengths": torch.tensor([6, 3, 5, 2])}),
    "distillation": (DistillationLoss(), torch.randn(B, L, V), {"token_mask": _mask(), **_teacher(0)}),
}


@pytest.mark.parametrize("name", list(SHIPPED))
def test_each_loss_declares_exactly_the_parts_it_reports(name):
    loss_fn, model_output, batch = SHIPPED[name]
    _, _, reported = loss_fn(model_output, batch)
    assert set(reported) == declared_parts(loss_fn)
    assert isinstance(loss_fn, LossFunction)


@pytest.mark.parametrize("name", list(SHIPPED))
def test_each_loss_logs_the_metric_names_it_always_logged(name):
    logged = {
        "nll": ["loss", "num_loss_tokens"],
        "clipped_pg": ["loss", "kl", "clip_fraction"],
        "dpo": ["loss", "preference_loss", "sft_loss", "accuracy", "margin", "chosen_reward", "rejected_reward"],
        "bradley_terry": ["loss", "accuracy", "margin", "chosen_score", "rejected_score"],
        "distillation": ["kl", "loss"],
    }[name]
    assert list(SHIPPED[name][0].metrics) == logged


def test_a_part_the_loss_does_not_declare_is_refused():
    with pytest.raises(ValueError, match=r"NLLLoss reported \['nll_mean'\]"):
        micro_batch_totals([{"nll_sum": torch.tensor(1.0), "nll_mean": torch.tensor(0.5)}], NLLLoss())


def _micro_batch(nll: float, tokens: int) -> dict[str, torch.Tensor]:
    return {"nll_sum": torch.tensor(nll), "num_tokens": torch.tensor(tokens, dtype=torch.int)}


def test_means_are_ratios_of_totals_over_micro_batches_ranks_and_steps():
    # Two optimizer steps, each on two data-parallel ranks of two micro-batches of uneven token counts.
    steps = [
        [[(6.0, 3), (1.0, 1)], [(10.0, 4), (0.0, 0)]],
        [[(2.0, 2), (9.0, 3)], [(4.0, 8), (3.0, 1)]],
    ]
    per_step = [
        add_totals(micro_batch_totals([_micro_batch(*mb) for mb in rank], NLLLoss()) for rank in ranks)
        for ranks in steps
    ]
    logged = logged_metrics(add_totals(per_step), NLLLoss())
    # By hand: 35 nll over 22 tokens in all.
    assert logged == {"loss": pytest.approx(35.0 / 22), "num_loss_tokens": 22.0}
    # Why the loss declares a mean "per num_tokens" instead of each rank reporting its mean: the mean of the
    # seven non-empty micro-batches' means (2, 1, 2.5, 1, 3, 0.5, 3) is 13 / 7, another number.
    assert logged["loss"] != pytest.approx(13.0 / 7, rel=0.1)
    # One step alone is its own ratio of totals.
    assert logged_metrics(per_step[0], NLLLoss())["loss"] == pytest.approx(17.0 / 8)


def test_a_mean_over_no_tokens_is_zero_not_a_division_error():
    totals = micro_batch_totals([_micro_batch(0.0, 0)], NLLLoss())
    assert logged_metrics(totals, NLLLoss()) == {"loss": 0.0, "num_loss_tokens": 0.0}


def test_a_metric_without_a_count_is_the_plain_total():
    assert Metric("num_tokens").of({"num_tokens": 7.0, "nll_sum": 3.0}) == 7.0
    assert Metric("nll_sum", per="num_tokens").parts() == ("nll_sum", "num_tokens")
