"""GRPO's pure pieces: rollout seeds, the trainer's batch layout, and the loss on a real rollout batch."""

from __future__ import annotations

import math

import pytest
import torch

from nemo_rl.algorithms.advantages import token_weights
from nemo_rl.algorithms.importance_correction import ImportanceCorrection
from nemo_rl.algorithms.loss_functions import ClippedPGLoss
from nemo_rl.algorithms.rollout_training import rollout_batch, rollout_seeds
from nemo_rl.data.prompt_dataset import PromptSample
from nemo_rl.data.token_alignment import align_to_predictions
from nemo_rl.models.generation.vllm_worker import Completion

PAD = 7
# Two samples with different prompt and response lengths: 3 + 2 = 5 and 1 + 8 = 9 tokens -> width 16.
SAMPLES = [PromptSample([11, 12, 13], "4"), PromptSample([31], "5")]
COMPLETIONS = [
    Completion([21, 22], [-0.5, -1.25], "ab", "stop"),
    Completion([41, 42, 43, 44, 45, 46, 47, 48], [-0.1, -0.2, -0.3, -0.4, -0.5, -0.6, -0.7, -0.8], "x" * 8, "length"),
]
ADVANTAGES = torch.tensor([0.75, -1.5])
# (row, first response token, end): the response tokens' positions in each row
RESPONSES = [(0, 3, 5), (1, 1, 9)]


def _batch(divisible_by: int = 8) -> dict[str, torch.Tensor]:
    return rollout_batch(SAMPLES, COMPLETIONS, ADVANTAGES, PAD, divisible_by)


# ----------------------------------------------------------------------------
# rollout_batch
# ----------------------------------------------------------------------------
def test_rollout_batch_layout():
    batch = _batch()
    assert set(batch) == {"input_ids", "loss_mask", "generation_logprobs", "advantages", "input_lengths"}
    assert batch["input_ids"].shape == (2, 16)  # the longest row, 9, rounded up to a multiple of 8
    p = PAD
    assert batch["input_ids"].tolist() == [
        [11, 12, 13, 21, 22, p, p, p, p, p, p, p, p, p, p, p],
        [31, 41, 42, 43, 44, 45, 46, 47, 48, p, p, p, p, p, p, p],
    ]
    assert batch["input_ids"].dtype == torch.long
    assert batch["input_lengths"].tolist() == [5, 9]
    assert batch["loss_mask"].tolist() == [
        [0, 0, 0, 1, 1] + [0] * 11,
        [0] + [1] * 8 + [0] * 7,
    ]
    gen = batch["generation_logprobs"]
    torch.testing.assert_close(gen[0], torch.tensor([0, 0, 0, -0.5, -1.25] + [0.0] * 11))
    torch.testing.assert_close(gen[1], torch.tensor([0, -0.1, -0.2, -0.3, -0.4, -0.5, -0.6, -0.7, -0.8] + [0.0] * 7))
    torch.testing.assert_close(batch["advantages"][0], torch.tensor([0, 0, 0, 0.75, 0.75] + [0.0] * 11))
    torch.testing.assert_close(batch["advantages"][1], torch.tensor([0.0] + [-1.5] * 8 + [0.0] * 7))


@pytest.mark.parametrize(("divisible_by", "width"), [(1, 9), (3, 9), (4, 12), (8, 16), (9, 9), (16, 16), (32, 32)])
def test_rollout_width_is_the_longest_row_rounded_up(divisible_by, width):
    batch = _batch(divisible_by)
    for key in ("input_ids", "loss_mask", "generation_logprobs", "advantages"):
        assert batch[key].shape == (2, width)
    assert int(batch["loss_mask"].sum()) == 2 + 8


def test_rollout_batch_checks_matching_lengths():
    with pytest.raises(ValueError):
        rollout_batch(SAMPLES, COMPLETIONS[:1], ADVANTAGES, PAD, 8)


# ----------------------------------------------------------------------------
# rollout_seeds
# ----------------------------------------------------------------------------
def test_rollout_seeds_are_deterministic_and_distinct():
    seeds = rollout_seeds(42, 3, 64)
    assert seeds == rollout_seeds(42, 3, 64)
    assert len(seeds) == 64 and len(set(seeds)) == 64
    assert all(type(s) is int and 0 <= s < 2**32 for s in seeds)
    # index i's seed does not depend on how many requests the step has
    assert rollout_seeds(42, 3, 10) == seeds[:10]


def test_rollout_seeds_differ_across_steps_and_run_seeds():
    by_step = {step: rollout_seeds(42, step, 16) for step in range(6)}
    all_seeds = [s for seeds in by_step.values() for s in seeds]
    assert len(set(all_seeds)) == len(all_seeds)
    assert set(rollout_seeds(43, 1, 16)).isdisjoint(by_step[1])


def test_rollout_seeds_of_an_empty_step():
    assert rollout_seeds(0, 0, 0) == []


# ----------------------------------------------------------------------------
# End to end: rollout batch -> aligned fields -> ClippedPGLoss, against explicit loops
# ----------------------------------------------------------------------------
EPS_LOW, EPS_HIGH, BETA = 0.2, 0.28, 0.05
# Per response token: the ratio exp(logp - prev) the new policy gives it, the trainer's previous log-prob,
# and ref - logp. Ratios probe both clip edges with both advantage signs.
RATIOS = [[1.5, 0.5], [0.5, 1.5, 1.0, 1.1, 0.9, 1.25, 0.79, 2.0]]
PREV = [[-0.6, -1.2], [-0.15, -0.25, -0.2, -0.45, -0.5, -0.7, -0.6, -0.9]]
REF_GAP = [[0.1, -0.2], [0.0, 0.3, -0.1, 0.05, 0.2, -0.3, 0.4, -0.05]]


def _e2e_inputs(sequence_level: bool):
    batch = _batch()
    width = batch["input_ids"].shape[1]
    # Trainer outputs, indexed by the token they score (as Policy.get_logprobs returns them); junk elsewhere.
    prev = torch.full((2, width), -3.0)
    ref = torch.full((2, width), -2.0)
    # token_logprobs[:, t] scores token t + 1; moderate junk where no response token is predicted.
    token_logprobs = torch.full((2, width), -1.7)
    for row, start, end in RESPONSES:
        for k, token in enumerate(range(start, end)):
            logp = PREV[row][k] + math.log(RATIOS[row][k])
            prev[row, token] = PREV[row][k]
            ref[row, token] = logp + REF_GAP[row][k]
            token_logprobs[row, token - 1] = logp
    batch["prev_logprobs"] = prev
    batch["reference_logprobs"] = ref
    batch["token_weight"] = token_weights(batch["loss_mask"], sequence_level)  # as the driver adds it
    aligned = align_to_predictions(batch)
    return batch, aligned, token_logprobs


def test_aligned_fields_sit_at_the_predicting_position():
    batch, aligned, _ = _e2e_inputs(sequence_level=True)
    assert "loss_mask" not in aligned and "input_lengths" not in aligned
    mask = aligned["token_mask"]
    assert mask.dtype == torch.float32
    assert mask[0].nonzero().flatten().tolist() == [2, 3]
    assert mask[1].nonzero().flatten().tolist() == list(range(0, 8))
    assert aligned["generation_logprobs"][0, 2:4].tolist() == [-0.5, -1.25]
    assert aligned["advantages"][1, :8].tolist() == [-1.5] * 8
    assert aligned["prev_logprobs"][1, 7].item() == pytest.approx(PREV[1][7])
    # the driver's weights, aligned, are the weights of the aligned mask
    torch.testing.assert_close(aligned["token_weight"], token_weights(mask, sequence_level=True))


def _hand_loss(sequence_level: bool, importance_sampling: bool):
    """Every response token of the rollout, one by one, from the lists above."""
    lengths = [end - start for _, start, end in RESPONSES]
    total, sequences = sum(lengths), len(lengths)
    gen_logprobs = [c.logprobs for c in COMPLETIONS]
    numerator = kl_sum = 0.0
    clipped_tokens = 0
    for row, n_i in enumerate(lengths):
        adv = float(ADVANTAGES[row])
        weight = total / (sequences * n_i) if sequence_level else 1.0
        for k in range(n_i):
            ratio = RATIOS[row][k]
            clipped_ratio = min(max(ratio, 1 - EPS_LOW), 1 + EPS_HIGH)
            unclipped_loss, clipped_loss = -adv * ratio, -adv * clipped_ratio
            loss = max(unclipped_loss, clipped_loss)
            if clipped_loss > unclipped_loss + 1e-9:
                clipped_tokens += 1
            log_ref_ratio = REF_GAP[row][k]
            kl = math.exp(log_ref_ratio) - log_ref_ratio - 1
            loss += BETA * kl
            if importance_sampling:
                loss *= math.exp(PREV[row][k] - gen_logprobs[row][k])
            numerator += weight * loss
            kl_sum += kl
    return numerator, total, kl_sum, clipped_tokens


@pytest.mark.parametrize("sequence_level", [True, False])
@pytest.mark.parametrize("importance_sampling", [False, True])
def test_clipped_pg_loss_on_a_rollout_batch_matches_explicit_loops(sequence_level, importance_sampling):
    batch, aligned, token_logprobs = _e2e_inputs(sequence_level)
    correction = ImportanceCorrection(weighted=True) if importance_sampling else None
    if correction is not None:  # the driver's importance weights, aligned like every per-token field
        aligned = align_to_predictions(batch | correction.fields(batch))
    loss_fn = ClippedPGLoss(
        ratio_clip_min=EPS_LOW,
        ratio_clip_max=EPS_HIGH,
        reference_policy_kl_penalty=BETA,
        importance_correction=correction,
    )
    numerator, num_tokens, metrics = loss_fn(token_logprobs, aligned)
    want_numerator, want_tokens, want_kl, want_clipped = _hand_loss(sequence_level, importance_sampling)
    assert want_tokens == 10 and want_clipped == 3  # the ratios were chosen to clip 1.5 (A>0), 0.5 and 0.79 (A<0)
    assert int(num_tokens) == want_tokens
    assert float(numerator) == pytest.approx(want_numerator, rel=1e-5)
    assert float(metrics["loss_sum"]) == pytest.approx(want_numerator, rel=1e-5)
    assert float(metrics["kl_sum"]) == pytest.approx(want_kl, rel=1e-5)
    assert int(metrics["clipped_tokens"]) == want_clipped


def test_sequence_level_loss_is_the_mean_of_sequence_means():
    """numerator / T with T / (N n_i) weights = mean over sequences of each one's token mean."""
    _, aligned, token_logprobs = _e2e_inputs(sequence_level=True)
    numerator, num_tokens, _ = ClippedPGLoss(EPS_LOW, EPS_HIGH, BETA)(token_logprobs, aligned)
    per_sequence = []
    for row, start, end in RESPONSES:
        adv = float(ADVANTAGES[row])
        losses = []
        for k in range(end - start):
            r = RATIOS[row][k]
            g = REF_GAP[row][k]
            losses.append(max(-adv * r, -adv * min(max(r, 1 - EPS_LOW), 1 + EPS_HIGH)) + BETA * (math.exp(g) - g - 1))
        per_sequence.append(sum(losses) / len(losses))
    assert float(numerator) / int(num_tokens) == pytest.approx(sum(per_sequence) / 2, rel=1e-5)


def test_loss_gradient_reaches_only_response_predictions():
    _, aligned, token_logprobs = _e2e_inputs(sequence_level=False)
    token_logprobs = token_logprobs.clone().requires_grad_(True)
    numerator, _, _ = ClippedPGLoss(EPS_LOW, EPS_HIGH, BETA)(token_logprobs, aligned)
    numerator.backward()
    nonzero = token_logprobs.grad.abs() > 0
    assert not (nonzero & (aligned["token_mask"] == 0)).any()
    # the clipped tokens (ratio outside the band on the advantage's side) get no policy-gradient term,
    # only the KL term's gradient: -BETA * (exp(g) - 1) w.r.t. logp
    g = REF_GAP[0][0]
    assert float(token_logprobs.grad[0, 2]) == pytest.approx(-BETA * (math.exp(g) - 1), rel=1e-4)
