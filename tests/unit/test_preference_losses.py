"""DPO and Bradley-Terry losses against hand-written references, and ``[B, L, k]`` per-token fields.

Rows of a preference micro-batch alternate chosen, rejected (``collate_pairs``);
both losses count pairs, not tokens.
"""

from __future__ import annotations

import math

import pytest
import torch

from nemo_rl.algorithms.loss_functions import (
    BradleyTerryLoss,
    ClippedPGLoss,
    DPOLoss,
    NLLLoss,
)
from nemo_rl.data.packing import pack_batch
from nemo_rl.data.token_alignment import align_to_predictions, token_fields
from nemo_rl.models.policy.interfaces import model_output_of


def _preference_batch(pairs: int = 3, length: int = 7, seed: int = 0):
    """Random per-token log-probs of the policy and the reference, and a response mask of varying length."""
    gen = torch.Generator().manual_seed(seed)
    rows = 2 * pairs
    policy = -torch.rand(rows, length, generator=gen, dtype=torch.float64) * 3
    reference = -torch.rand(rows, length, generator=gen, dtype=torch.float64) * 3
    mask = torch.zeros(rows, length, dtype=torch.float64)
    for r in range(rows):
        start = 1 + r % 2
        end = length - (r % 3)
        mask[r, start:end] = 1.0
    return policy, {"token_mask": mask, "reference_logprobs": reference}


def _dpo_reference(policy, batch, beta, sft_weight, average):
    """Per-pair loop in plain Python floats: rewards, margins, the losses and the metrics."""
    mask, ref = batch["token_mask"].tolist(), batch["reference_logprobs"].tolist()
    lp = policy.tolist()
    rewards, sums, counts = [], [], []
    for r in range(len(lp)):
        policy_sum = sum(p * m for p, m in zip(lp[r], mask[r]))
        ref_sum = sum(q * m for q, m in zip(ref[r], mask[r]))
        n = sum(mask[r])
        if average:
            policy_sum, ref_sum = policy_sum / n, ref_sum / n
        rewards.append(beta * (policy_sum - ref_sum))
        sums.append(sum(p * m for p, m in zip(lp[r], mask[r])))
        counts.append(n)
    total = pref_total = sft_total = margin_total = 0.0
    correct = 0
    for i in range(len(lp) // 2):
        margin = rewards[2 * i] - rewards[2 * i + 1]
        pref = math.log1p(math.exp(-margin))  # -log sigmoid(margin)
        sft = -sums[2 * i] / counts[2 * i]  # chosen response's per-token NLL
        total += pref + sft_weight * sft
        pref_total += pref
        sft_total += sft
        margin_total += margin
        correct += margin > 0
    return {
        "loss_sum": total,
        "preference_loss_sum": pref_total,
        "sft_loss_sum": sft_total,
        "margin_sum": margin_total,
        "accuracy_sum": correct,
        "chosen_reward_sum": sum(rewards[0::2]),
        "rejected_reward_sum": sum(rewards[1::2]),
    }


# ----------------------------------------------------------------------------
# DPO
# ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("beta", "sft_weight", "average"), [(0.1, 0.0, False), (0.5, 0.3, False), (2.0, 1.0, True), (0.1, 0.0, True)]
)
def test_dpo_matches_the_hand_written_reference(beta, sft_weight, average):
    policy, batch = _preference_batch(pairs=4, seed=int(beta * 10) + int(average))
    numerator, count, metrics = DPOLoss(beta, sft_weight, average)(policy, batch)
    expected = _dpo_reference(policy, batch, beta, sft_weight, average)
    assert int(count) == 4
    assert numerator.item() == pytest.approx(expected["loss_sum"], rel=1e-10)
    for key, value in expected.items():
        assert float(metrics[key]) == pytest.approx(value, rel=1e-10, abs=1e-12), key
    assert int(metrics["num_pairs"]) == 4


def test_average_log_probs_changes_the_rewards_by_the_token_count():
    policy, batch = _preference_batch(pairs=2, seed=3)
    beta = 0.7
    _, _, summed = DPOLoss(beta)(policy, batch)
    _, _, averaged = DPOLoss(beta, average_log_probs=True)(policy, batch)
    tokens = batch["token_mask"].sum(-1)
    per_row = beta * ((policy - batch["reference_logprobs"]) * batch["token_mask"]).sum(-1)
    assert float(summed["chosen_reward_sum"]) == pytest.approx(float(per_row[0::2].sum()))
    assert float(averaged["chosen_reward_sum"]) == pytest.approx(float((per_row / tokens)[0::2].sum()))
    assert float(averaged["rejected_reward_sum"]) == pytest.approx(float((per_row / tokens)[1::2].sum()))


def test_policy_equal_to_the_reference_gives_log2_per_pair_and_zero_margin():
    policy, batch = _preference_batch(pairs=5, seed=7)
    batch["reference_logprobs"] = policy.clone()
    numerator, count, metrics = DPOLoss(0.3)(policy, batch)
    assert int(count) == 5
    assert numerator.item() == pytest.approx(5 * math.log(2))
    assert float(metrics["margin_sum"]) == 0.0
    assert int(metrics["accuracy_sum"]) == 0  # a zero margin is not a correct ranking
    assert float(metrics["chosen_reward_sum"]) == 0.0 and float(metrics["rejected_reward_sum"]) == 0.0


def test_the_sft_term_adds_the_chosen_per_token_nll_times_its_weight():
    policy, batch = _preference_batch(pairs=3, seed=11)
    plain, _, _ = DPOLoss(0.1)(policy, batch)
    weighted, _, metrics = DPOLoss(0.1, sft_loss_weight=0.25)(policy, batch)
    mask = batch["token_mask"]
    nll = -(policy * mask).sum(-1)[0::2] / mask.sum(-1)[0::2]
    assert float(metrics["sft_loss_sum"]) == pytest.approx(float(nll.sum()))
    assert (weighted - plain).item() == pytest.approx(0.25 * float(nll.sum()))


def test_masked_positions_do_not_matter():
    policy, batch = _preference_batch(pairs=2, seed=5)
    noisy = policy.clone()
    noisy[batch["token_mask"] == 0] = -100.0
    a, _, _ = DPOLoss(0.2, 0.5)(policy, batch)
    b, _, _ = DPOLoss(0.2, 0.5)(noisy, batch)
    assert a.item() == pytest.approx(b.item())


def test_raising_the_chosen_logprobs_lowers_the_loss():
    policy, batch = _preference_batch(pairs=3, seed=13)
    policy = policy.clone().requires_grad_(True)
    loss, _, _ = DPOLoss(0.5)(policy, batch)
    loss.backward()
    mask = batch["token_mask"].bool()
    chosen_grad, rejected_grad = policy.grad[0::2], policy.grad[1::2]
    assert (chosen_grad[mask[0::2]] < 0).all()
    assert (rejected_grad[mask[1::2]] > 0).all()
    assert (policy.grad[~mask] == 0).all()
    # and a finite step along it agrees
    with torch.no_grad():
        raised = policy.detach().clone()
        raised[0::2] += 0.1 * batch["token_mask"][0::2]
    assert DPOLoss(0.5)(raised, batch)[0].item() < loss.item()


def test_an_odd_number_of_rows_is_refused():
    policy, batch = _preference_batch(pairs=2)
    with pytest.raises(ValueError, match="pairs"):
        DPOLoss(0.1)(policy[:3], {k: v[:3] for k, v in batch.items()})


# ----------------------------------------------------------------------------
# Bradley-Terry
# ----------------------------------------------------------------------------
def test_bradley_terry_reads_each_score_at_the_last_token():
    lengths = torch.tensor([3, 5, 6, 2])
    last_scores = torch.tensor([1.5, -0.5, 0.2, 0.9])
    scores = torch.full((4, 6), 100.0)  # any other position would change the loss by a lot
    scores[torch.arange(4), lengths - 1] = last_scores
    numerator, count, metrics = BradleyTerryLoss()(scores, {"input_lengths": lengths})
    margins = [1.5 - (-0.5), 0.2 - 0.9]
    expected = sum(math.log1p(math.exp(-m)) for m in margins)
    assert int(count) == 2
    assert numerator.item() == pytest.approx(expected, rel=1e-6)
    assert float(metrics["loss_sum"]) == pytest.approx(expected, rel=1e-6)
    assert int(metrics["accuracy_sum"]) == 1
    assert float(metrics["margin_sum"]) == pytest.approx(sum(margins))
    assert float(metrics["chosen_score_sum"]) == pytest.approx(1.5 + 0.2)
    assert float(metrics["rejected_score_sum"]) == pytest.approx(-0.5 + 0.9)
    assert int(metrics["num_pairs"]) == 2


def test_bradley_terry_matches_a_torch_reference_with_gradients_only_at_the_last_tokens():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 9, generator=gen, requires_grad=True)
    lengths = torch.tensor([9, 4, 7, 1, 5, 8])
    loss, _, metrics = BradleyTerryLoss()(scores, {"input_lengths": lengths})
    picked = scores.detach().gather(1, (lengths - 1).unsqueeze(1)).squeeze(1)
    margin = picked[0::2] - picked[1::2]
    assert loss.item() == pytest.approx(float(torch.nn.functional.softplus(-margin).sum()), rel=1e-6)
    assert int(metrics["accuracy_sum"]) == int((margin > 0).sum())
    loss.backward()
    expected_grad = torch.zeros_like(scores)
    expected_grad[torch.arange(6), lengths - 1] = torch.stack(
        [-torch.sigmoid(-margin), torch.sigmoid(-margin)], dim=1
    ).reshape(-1)
    torch.testing.assert_close(scores.grad, expected_grad)


def test_bradley_terry_refuses_an_odd_number_of_rows():
    with pytest.raises(ValueError, match="pairs"):
        BradleyTerryLoss()(torch.zeros(3, 4), {"input_lengths": torch.tensor([4, 4, 4])})


def test_each_loss_declares_what_it_reads_from_the_model():
    assert model_output_of(BradleyTerryLoss()) == "scores"
    assert BradleyTerryLoss.model_output == "scores"
    assert model_output_of(DPOLoss(0.1)) == "token_logprobs"
    assert model_output_of(NLLLoss()) == "token_logprobs"
    assert model_output_of(ClippedPGLoss()) == "token_logprobs"


# ----------------------------------------------------------------------------
# [B, L, k] per-token fields
# ----------------------------------------------------------------------------
def _topk_batch():
    b, length, k = 3, 6, 4
    gen = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.arange(b * length).reshape(b, length) + 10,
        "position_ids": torch.arange(length).expand(b, -1),
        "loss_mask": torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]]),
        "teacher_topk_logprobs": torch.randn(b, length, k, generator=gen),
        "teacher_topk_indices": torch.randint(0, 100, (b, length, k), generator=gen),
        "input_lengths": torch.tensor([5, 3, 6]),
        "other_length": torch.zeros(b, length + 1),
    }


def test_token_fields_include_b_l_k_fields_and_nothing_else():
    fields = token_fields(_topk_batch())
    assert sorted(fields) == ["loss_mask", "teacher_topk_indices", "teacher_topk_logprobs"]


def test_align_to_predictions_shifts_b_l_k_fields_along_the_sequence():
    batch = _topk_batch()
    aligned = align_to_predictions(batch)
    assert set(aligned) == {"token_mask", "teacher_topk_logprobs", "teacher_topk_indices"}
    for key in ("teacher_topk_logprobs", "teacher_topk_indices"):
        field = batch[key]
        expected = torch.roll(field, shifts=-1, dims=1)
        expected[:, -1] = 0
        assert aligned[key].shape == field.shape and aligned[key].dtype == field.dtype
        torch.testing.assert_close(aligned[key], expected)
        for t in range(field.shape[1] - 1):  # position t predicts token t + 1
            assert torch.equal(aligned[key][:, t], field[:, t + 1])
    assert aligned["token_mask"].dtype == torch.float32
    torch.testing.assert_close(aligned["token_mask"][:, :-1], batch["loss_mask"][:, 1:].float())


def test_pack_batch_keeps_each_samples_k_vectors_at_its_packed_positions():
    batch = _topk_batch()
    del batch["position_ids"], batch["other_length"]
    capacity, multiple = 16, 4
    rows, stats = pack_batch(batch, capacity, multiple)
    assert stats.real_tokens == 14
    seen = []
    for row in rows:
        values, indices = row["teacher_topk_logprobs"], row["teacher_topk_indices"]
        assert values.shape == (1, capacity, 4) and values.dtype == torch.float32
        assert indices.shape == (1, capacity, 4) and indices.dtype == torch.int64
        bounds = row["cu_seqlens"].tolist()
        used = torch.zeros(capacity, dtype=torch.bool)
        for start, end in zip(bounds[:-1], bounds[1:]):
            first = int(row["input_ids"][0, start])
            if first == 0:  # the row's trailing padding segment
                continue
            sample = (first - 10) // batch["input_ids"].shape[1]
            n = int(batch["input_lengths"][sample])
            assert end - start == -(-n // multiple) * multiple  # the sample padded to the layout's multiple
            assert torch.equal(row["input_ids"][0, start : start + n], batch["input_ids"][sample, :n])
            assert torch.equal(values[0, start : start + n], batch["teacher_topk_logprobs"][sample, :n])
            assert torch.equal(indices[0, start : start + n], batch["teacher_topk_indices"][sample, :n])
            used[start : start + n] = True
            seen.append(sample)
        assert (values[0, ~used] == 0).all() and (indices[0, ~used] == 0).all()
    assert sorted(seen) == [0, 1, 2]
