"""A rollout's length metrics: responses cut at ``max_new_tokens`` and at the run's window are counted, not errors."""

from __future__ import annotations

import pytest
import torch

from nemo_rl.algorithms.rollout_training import Responses
from nemo_rl.data.prompt_dataset import PromptSample
from nemo_rl.models.generation.vllm_worker import Completion


def _completion(length: int, finish_reason: str) -> Completion:
    return Completion(list(range(length)), [-1.0] * length, "x" * length, finish_reason)


def test_cut_responses_are_counted_by_cause():
    # Window 16: prompt 10 + 6 reaches it (the engine stopped there), prompt 4 + 4 stopped at max_new_tokens = 4,
    # prompt 3 + 2 ended on its own.
    samples = [PromptSample([1] * 10, "a"), PromptSample([1] * 4, "b"), PromptSample([1] * 3, "c")]
    completions = [_completion(6, "length"), _completion(4, "length"), _completion(2, "stop")]
    metrics = Responses(completions, torch.zeros(3), {}).length_metrics(samples, max_total_sequence_length=16)
    assert metrics == {
        "generation_length_mean": pytest.approx(4.0),
        "generation_length_max": 6.0,
        "truncated_fraction": pytest.approx(2 / 3),
        "window_truncated_fraction": pytest.approx(1 / 3),
    }
