"""The train/generate parity probe against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from nemo_rl.algorithms.logprob_parity import (
    MIN_BUCKET_TOKENS,
    Agreement,
    ParityError,
    ParityReport,
    PositionBucket,
    check_first_step,
    measure_parity,
    position_buckets,
    token_mult_prob_error,
)


def test_identical_logprobs_give_exactly_one():
    logprobs = torch.tensor([[-0.3, -1.2, -4.0], [-0.01, -2.5, -0.7]])
    assert token_mult_prob_error(logprobs, logprobs.clone(), torch.ones(2, 3)) == 1.0


def test_known_gaps_give_the_mean_of_exp_gap():
    generation = torch.tensor([[-1.0, -2.0, -0.5, 0.0]])
    policy = torch.tensor([[-1.1, -2.3, -0.5, 0.0]])  # gaps 0.1 and 0.3 on the masked tokens
    mask = torch.tensor([[1, 1, 0, 0]])
    expected = (math.exp(0.1) + math.exp(0.3)) / 2
    assert token_mult_prob_error(generation, policy, mask) == pytest.approx(expected, rel=1e-6)


def test_masked_out_tokens_are_ignored_even_if_huge():
    generation = torch.tensor([[-1.0, -50.0, -2.0], [-0.5, 0.0, -80.0]])
    policy = torch.tensor([[-1.2, -1.0, -2.0], [-0.5, -70.0, -1.0]])
    mask = torch.tensor([[1, 0, 1], [1, 0, 0]])  # gaps 0.2, 0, 0 kept; 49, 70, 79 dropped
    expected = (math.exp(0.2) + 1 + 1) / 3
    assert token_mult_prob_error(generation, policy, mask) == pytest.approx(expected, rel=1e-6)


def test_error_is_sign_symmetric():
    a = torch.tensor([[-1.0, -2.0, -3.0]])
    b = torch.tensor([[-1.25, -1.5, -3.1]])
    mask = torch.ones(1, 3)
    expected = (math.exp(0.25) + math.exp(0.5) + math.exp(0.1)) / 3
    assert token_mult_prob_error(a, b, mask) == pytest.approx(expected, rel=1e-6)
    assert token_mult_prob_error(b, a, mask) == pytest.approx(expected, rel=1e-6)


def test_bool_and_float_masks_agree():
    a, b = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -9.0]])
    assert token_mult_prob_error(a, b, torch.tensor([[True, False]])) == pytest.approx(math.exp(0.5))
    assert token_mult_prob_error(a, b, torch.tensor([[1.0, 0.0]])) == pytest.approx(math.exp(0.5))


def test_empty_mask_gives_one():
    a, b = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-5.0, -9.0]])
    assert token_mult_prob_error(a, b, torch.zeros(1, 2)) == 1.0


def _report(error: float, tokens: int = 64) -> ParityReport:
    """A report whose generated tokens all sit in the window bucket with the given error."""
    agreement = Agreement(error, 0.0, tokens)
    return ParityReport(agreement, {"window": (PositionBucket("window", 0, 256), agreement)})


@pytest.mark.parametrize("error", [1.0, 1.03, 1.05])
def test_first_step_passes_at_or_below_threshold(error):
    check_first_step(_report(error), 1.05, long_context=True, section="grpo")
    check_first_step(_report(error), 1.05, long_context=False, section="grpo")


def test_first_step_above_threshold_stops_with_an_explanation():
    with pytest.raises(ParityError) as info:
        check_first_step(_report(1.2345), 1.05, long_context=False, section="grpo")
    message = str(info.value)
    assert "grpo.token_mult_prob_error_threshold" in message
    assert "1.2345" in message and "1.05" in message
    assert "Nothing was trained" in message
    assert "RoPE" not in message


def test_long_context_failure_points_at_rope_overrides():
    with pytest.raises(ParityError) as info:
        check_first_step(_report(1.5), 1.05, long_context=True, section="grpo")
    message = str(info.value)
    assert "RoPE overrides" in message
    assert "policy.hf_config_overrides" in message
    assert "1.5000" in message and "Nothing was trained" in message


def test_parity_error_is_a_runtime_error():
    assert issubclass(ParityError, RuntimeError)


def test_buckets_double_from_the_window_until_the_last_position():
    assert [(b.name, b.start, b.end) for b in position_buckets(256, 1024)] == [
        ("window", 0, 256),
        ("1-2x", 256, 512),
        ("2-4x", 512, 1024),
    ]
    assert [b.name for b in position_buckets(256, 2048)][-1] == "4-8x"
    assert [b.name for b in position_buckets(256, 1025)][-1] == "4-8x"  # position 1024 lies beyond 4x
    assert [b.name for b in position_buckets(1024, 1024)] == ["window"]  # no long context: one bucket


def test_per_bucket_error_and_kl_by_hand():
    # Window 2: positions 0-1 are "window", 2-3 "1-2x", 4-7 "2-4x". Gaps r = train - gen on masked tokens:
    # position 1: 0.1; position 2: -0.2; position 3: 0.0; position 5: 0.4 (row 2); position 6: masked out.
    gen = torch.zeros(2, 8)
    train = torch.zeros(2, 8)
    train[0, 1], train[0, 2], train[1, 5], train[1, 6] = 0.1, -0.2, 0.4, 9.0
    mask = torch.zeros(2, 8)
    mask[0, 1:4] = 1
    mask[1, 5] = 1
    report = measure_parity(gen, train, mask, window=2)
    k3 = lambda r: math.exp(r) - r - 1  # noqa: E731
    assert list(report.buckets) == ["window", "1-2x", "2-4x"]
    window, mid, far = (report.buckets[name][1] for name in ("window", "1-2x", "2-4x"))
    assert (window.tokens, mid.tokens, far.tokens) == (1, 2, 1)
    assert window.error == pytest.approx(math.exp(0.1)) and window.kl == pytest.approx(k3(0.1))
    assert mid.error == pytest.approx((math.exp(0.2) + 1) / 2) and mid.kl == pytest.approx(k3(-0.2) / 2)
    assert far.error == pytest.approx(math.exp(0.4)) and far.kl == pytest.approx(k3(0.4))
    overall = (math.exp(0.1) + math.exp(0.2) + 1 + math.exp(0.4)) / 4
    assert report.overall.error == pytest.approx(overall) and report.overall.tokens == 4
    assert report.overall.error == pytest.approx(token_mult_prob_error(gen, train, mask))
    metrics = report.metrics()
    assert metrics["token_mult_prob_error/2-4x"] == far.error and metrics["generator_kl"] == report.overall.kl
    assert "token_mult_prob_error/4-8x" not in metrics  # empty buckets are left out


def test_buckets_without_tokens_are_omitted():
    mask = torch.zeros(1, 8)
    mask[0, 6] = 1
    assert list(measure_parity(torch.zeros(1, 8), torch.zeros(1, 8), mask, window=2).buckets) == ["2-4x"]


def test_a_mismatch_beyond_the_window_stops_though_the_overall_mean_passes():
    # 200 tokens in the window agree exactly; 40 at 2-4x are off by 0.01 each: the overall mean is
    # 1 + 40/240 * 0.01005 = 1.0017 < 1.002 threshold, the 2-4x bucket 1.01005 is not.
    length = 1024
    gen, train, mask = torch.zeros(1, length), torch.zeros(1, length), torch.zeros(1, length)
    mask[0, 40:240] = 1
    mask[0, 600:640] = 1
    train[0, 600:640] = 0.01
    report = measure_parity(gen, train, mask, window=256)
    assert report.overall.error < 1.002
    with pytest.raises(
        ParityError,
        match=r"token_mult_prob_error/2-4x = 1\.0101 over 40 generated tokens at "
        r"positions 512-1023 on the first step exceeds grpo\.token_mult_prob_error_threshold = 1\.002",
    ):
        check_first_step(report, 1.002, long_context=True, section="grpo")


def test_a_bucket_with_too_few_tokens_does_not_decide():
    length = 1024
    gen, train, mask = torch.zeros(1, length), torch.zeros(1, length), torch.zeros(1, length)
    mask[0, 40:240] = 1
    mask[0, 600 : 600 + MIN_BUCKET_TOKENS - 1] = 1
    train[0, 600 : 600 + MIN_BUCKET_TOKENS - 1] = 0.01  # too few tokens to trust the bucket's mean
    report = measure_parity(gen, train, mask, window=256)
    assert report.deciding() == ("/window", report.buckets["window"][1])
    check_first_step(report, 1.002, long_context=True, section="grpo")
    assert report.deciding(min_tokens=1)[0] == "/2-4x"
