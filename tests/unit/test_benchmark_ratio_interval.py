"""The benchmarks' bootstrap interval of a speed ratio: rounds drawn in pairs, so drift both sides shared cancels."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "megatron_vs_hf_throughput.py"


@pytest.fixture(scope="module")
def ratio_interval():
    spec = importlib.util.spec_from_file_location("megatron_vs_hf_throughput", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.ratio_interval


def test_drift_shared_by_both_sides_of_a_round_does_not_widen_the_interval(ratio_interval):
    # the host ran 1x, 1.5x and 3x slower in the three rounds; "theirs" took twice as long in every one
    ours = [[0.1] * 4, [0.15] * 4, [0.3] * 4]
    theirs = [[2 * s for s in steps] for steps in ours]
    assert ratio_interval(ours, theirs) == pytest.approx((2.0, 2.0))


def test_the_interval_holds_the_ratio_and_narrows_with_more_steps(ratio_interval):
    rng = random.Random(0)

    def rounds(scale: float, steps: int) -> list[list[float]]:
        return [[scale * rng.gauss(1.0, 0.1) for _ in range(steps)] for _ in range(3)]

    few = ratio_interval(rounds(1.0, 4), rounds(1.1, 4))
    many = ratio_interval(rounds(1.0, 64), rounds(1.1, 64))
    assert few[0] < 1.1 < few[1] and many[0] < 1.1 < many[1]
    assert many[1] - many[0] < (few[1] - few[0]) / 2
    assert many[0] > 1.0  # 10 % apart at 10 % step noise: 192 steps a side tell the sides apart


def test_one_round_resamples_its_steps(ratio_interval):
    low, high = ratio_interval([[1.0, 1.1, 0.9, 1.0]], [[2.0, 2.2, 1.8, 2.0]])
    assert 1.6 <= low <= 2.0 <= high <= 2.45


def test_steps_that_differ_by_index_are_drawn_in_pairs(ratio_interval):
    # GRPO: step j is other prompts than step j + 1, and the same prompts on both sides
    ours = [[1.3, 0.3, 0.6, 0.6]]
    theirs = [[1.5 * s for s in ours[0]]]
    assert ratio_interval(ours, theirs, paired_steps=True) == pytest.approx((1.5, 1.5))
    low, high = ratio_interval(ours, theirs)  # drawn apart, the steps' own spread would swamp the sides'
    assert low < 1.0 and high > 2.0
    with pytest.raises(ValueError, match="as many on both sides"):
        ratio_interval(ours, [theirs[0][:3]], paired_steps=True)
