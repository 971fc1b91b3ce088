"""DAPO's dynamic sampling: which groups are dropped, what a step trains on, and that refills replay on resume."""

from __future__ import annotations

import pytest
import torch

from nemo_rl.algorithms.dynamic_sampling import (
    DynamicSampling,
    ScoredBatch,
    choose_groups,
    has_signal,
    whole_step_groups,
)
from nemo_rl.algorithms.grpo import GRPORun
from nemo_rl.algorithms.reward_shaping import OverlongShaping
from nemo_rl.algorithms.rollout_training import Responses, Timer, rollout_seeds
from nemo_rl.config.loader import load_config, resolve_config
from nemo_rl.config.schema import GRPOMasterConfig, validate_grpo_config
from nemo_rl.data.dataloader import ResumableDataloader
from nemo_rl.data.prompt_dataset import PromptSample
from nemo_rl.models.generation.vllm_worker import Completion
from tests.unit.test_grpo_config import GRPO_YAML


# ----------------------------------------------------------------------------
# has_signal, choose_groups, whole_step_groups
# ----------------------------------------------------------------------------
def test_groups_with_all_equal_rewards_have_no_signal():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5, 0.0, 0.0, 1e-3, -0.2, -0.2, -0.2])
    assert has_signal(rewards, 3) == [False, True, False, True, False]


def test_enough_groups_train_the_first_target_in_generation_order():
    signal = [False, True, True, False, True, True, True]
    assert choose_groups(signal, target=4, whole=2) == [1, 2, 4, 5]  # group 6 has a signal but is surplus


def test_at_the_cap_whole_optimizer_steps_of_kept_groups_are_trained():
    signal = [True, False, True, False, True, False, False, False]
    # 3 kept, 2 groups per whole step: the first 2 train, the third is discarded
    assert choose_groups(signal, target=4, whole=2) == [0, 2]
    assert choose_groups([True, True, True, True, False, True], target=6, whole=2) == [0, 1, 2, 3]


def test_fewer_than_one_whole_step_is_padded_with_the_first_groups_without_signal():
    signal = [False, False, True, False, False, False]
    assert choose_groups(signal, target=4, whole=4) == [0, 1, 2, 3]  # kept group 2 plus padding 0, 1, 3
    assert choose_groups([False, False, False, True, True], target=4, whole=4) == [0, 1, 3, 4]
    assert choose_groups([False] * 6, target=4, whole=2) == [0, 1]  # nothing kept: one step of plain GRPO


@pytest.mark.parametrize(
    ("group_size", "global_batch", "logprob_rows", "groups"),
    [
        (4, 16, 8, 4),  # the shipped recipe: 16 rows
        (4, 8, 8, 2),  # 8 rows
        (3, 6, 4, 4),  # lcm(6, 4) = 12 rows = 4 groups of 3
        (16, 8, 8, 1),  # one group already fills an optimizer step
        (6, 4, 4, 2),  # 12 rows: lcm(4, 6)
    ],
)
def test_whole_step_groups(group_size, global_batch, logprob_rows, groups):
    assert whole_step_groups(group_size, global_batch, logprob_rows) == groups
    rows = groups * group_size
    assert rows % global_batch == 0 and rows % logprob_rows == 0


# ----------------------------------------------------------------------------
# DynamicSampling.gather
# ----------------------------------------------------------------------------
G = 2


def _batch(rewards: list[float], first_prompt: int) -> ScoredBatch:
    """Responses to len(rewards) / G prompts numbered from ``first_prompt``, with those rewards."""
    samples = [PromptSample([first_prompt + i // G], str(first_prompt + i // G)) for i in range(len(rewards))]
    completions = [Completion([1], [0.0], "r", "stop") for _ in rewards]
    return ScoredBatch(samples, completions, torch.tensor(rewards, dtype=torch.float32), torch.zeros(len(rewards)))


def _prompts(batch: ScoredBatch) -> list[int]:
    return [s.input_ids[0] for s in batch.samples[::G]]


def test_gather_refills_until_the_target_in_order():
    # 4 groups per step; batch 0 has 1 group with a signal (prompt 1), batch 1 two (5, 7), batch 2 three (8, 9, 11)
    batches = {
        1: _batch([0, 0, 1, 0, 1, 1, 0, 0], 4),
        2: _batch([0, 1, 1, 0, 1, 1, 1, 0], 8),
        3: _batch([0, 1] * 4, 12),
    }
    asked: list[int] = []

    def more(index: int) -> ScoredBatch:
        asked.append(index)
        return batches[index]

    sampling = DynamicSampling(G, target=4, whole=2, max_generation_batches=10)
    trained, metrics = sampling.gather(_batch([0, 0, 1, 0, 1, 1, 0, 0], 0), more)
    assert asked == [1, 2]  # stopped once 4 groups had a signal
    assert _prompts(trained) == [1, 5, 8, 9]  # generation order; 11 is surplus
    assert trained.environment_rewards.tolist() == [1, 0, 1, 0, 0, 1, 1, 0]
    assert metrics == {
        "dynamic_sampling/generation_batches": 3.0,
        "dynamic_sampling/kept_groups": 5.0,
        "dynamic_sampling/dropped_groups": 7.0,
        "dynamic_sampling/trained_groups": 4.0,
        "dynamic_sampling/discarded_groups": 1.0,
        "dynamic_sampling/padded_groups": 0.0,
        "dynamic_sampling/reward_mean": 0.5,
    }


def test_gather_without_refills_when_the_first_batch_suffices():
    first = _batch([0, 1, 1, 0, 0.5, 1, 2, 3], 0)

    def more(index: int) -> ScoredBatch:
        raise AssertionError("no refill needed")

    trained, metrics = DynamicSampling(G, target=4, whole=4, max_generation_batches=3).gather(first, more)
    assert _prompts(trained) == [0, 1, 2, 3] and metrics["dynamic_sampling/generation_batches"] == 1.0


def test_gather_at_the_cap_trims_to_whole_steps():
    first = _batch([0, 1, 0, 0, 0, 0, 0, 0], 0)  # 1 kept: prompt 0
    refills = {1: _batch([1, 1, 1, 0, 0, 0, 0, 1], 4)}  # 2 kept: prompts 5, 7
    trained, metrics = DynamicSampling(G, target=4, whole=2, max_generation_batches=2).gather(
        first, refills.__getitem__
    )
    assert _prompts(trained) == [0, 5]  # 3 kept, whole steps of 2 groups: prompt 7 discarded
    assert metrics["dynamic_sampling/trained_groups"] == 2.0
    assert metrics["dynamic_sampling/discarded_groups"] == 1.0
    assert metrics["dynamic_sampling/padded_groups"] == 0.0


def test_gather_at_the_cap_pads_below_one_whole_step(caplog):
    first = _batch([0, 0, 0, 0, 1, 0, 1, 1], 0)  # 1 kept: prompt 2
    with caplog.at_level("WARNING"):
        trained, metrics = DynamicSampling(G, target=4, whole=4, max_generation_batches=1).gather(first, {}.__getitem__)
    assert _prompts(trained) == [0, 1, 2, 3]  # prompt 2 and the three without a signal
    assert metrics["dynamic_sampling/padded_groups"] == 3.0 and metrics["dynamic_sampling/trained_groups"] == 4.0
    assert "1 of 4 prompt groups had a reward signal after 1 generation batches" in caplog.text


def test_gather_reads_the_signal_after_reward_shaping():
    # Equal environment rewards, different penalties: a signal the advantages see.
    first = ScoredBatch(
        [PromptSample([0], "0")] * 2,
        [Completion([1], [0.0], "r", "stop")] * 2,
        torch.zeros(2),
        torch.tensor([0.0, -0.5]),
    )
    trained, metrics = DynamicSampling(G, target=1, whole=1, max_generation_batches=1).gather(first, {}.__getitem__)
    assert metrics["dynamic_sampling/kept_groups"] == 1.0 and trained.rewards.tolist() == [0.0, -0.5]


# ----------------------------------------------------------------------------
# Wiring in GRPORun: refills come from the run's loader with the step's next seeds, and replay on resume
# ----------------------------------------------------------------------------
def _config(*overrides: str) -> GRPOMasterConfig:
    return validate_grpo_config(resolve_config(load_config(GRPO_YAML, list(overrides))))


class _ScriptedRun(GRPORun):
    """GRPORun's sampling without workers: prompt p's responses score (k % 2) when p % 3 == 0, else 0."""

    def __init__(self, cfg: GRPOMasterConfig, prompts: int = 40):
        self.cfg, self.loop = cfg, cfg.grpo
        data = [PromptSample([p], str(p)) for p in range(prompts)]
        self.train_loader = ResumableDataloader(data, cfg.grpo.num_prompts_per_step, True, cfg.grpo.seed)
        self.shaping = OverlongShaping.of(cfg.grpo.reward_shaping, 16)
        self.dynamic_sampling = DynamicSampling.of(cfg, cfg.policy.logprob_batch_size or 1)
        self.requests: list[tuple[list[int], list[int]]] = []

    def generate(self, samples, seeds, greedy, timer) -> Responses:
        self.requests.append(([s.input_ids[0] for s in samples], list(seeds)))
        rewards = [float(k % 2) if s.input_ids[0] % 3 == 0 else 0.0 for k, s in enumerate(samples)]
        completions = [Completion([1] * (1 + k % 3), [0.0] * (1 + k % 3), "r", "stop") for k in range(len(samples))]
        return Responses(completions, torch.tensor(rewards), {})

    def sample_step(self, step: int) -> tuple[ScoredBatch, dict[str, float]]:
        """The sampling part of ``learn``."""
        self.step = step
        samples, seeds = self.step_requests(self.train_loader.next_batch(), 0)
        _, first = self.scored_generation(*self.oversampled(samples, seeds), Timer())
        return self.gathered(first, Timer())


DS = ("grpo.use_dynamic_sampling=true", "grpo.dynamic_sampling_max_gen_batches=5")


def test_refills_continue_the_loader_and_the_steps_seed_index():
    run = _ScriptedRun(_config(*DS))
    reference = ResumableDataloader(run.train_loader.dataset, 4, True, 42)
    trained, metrics = run.sample_step(3)
    batches = int(metrics["dynamic_sampling/generation_batches"])
    assert batches > 1 and len(run.requests) == batches
    for index, (prompts, seeds) in enumerate(run.requests):
        assert prompts == [p.input_ids[0] for p in reference.next_batch() for _ in range(4)]  # the loader's next batch
        assert seeds == rollout_seeds(42, 3, 16, start=16 * index)  # the step's requests 16 * index on
    assert run.train_loader.state_dict() == reference.state_dict()
    assert all(p % 3 == 0 for p in {s.input_ids[0] for s in trained.samples})
    assert metrics["dynamic_sampling/trained_groups"] == 4.0


def test_a_resumed_step_draws_and_seeds_the_same_refills():
    cfg = _config(*DS)
    full = _ScriptedRun(cfg)
    full.sample_step(1)
    saved = full.train_loader.state_dict()
    full_step = full.sample_step(2)

    resumed = _ScriptedRun(cfg)
    resumed.train_loader.load_state_dict(saved)
    resumed_step = resumed.sample_step(2)
    assert resumed.requests == full.requests[-len(resumed.requests) :]
    assert resumed_step[1] == full_step[1]
    assert [s.input_ids for s in resumed_step[0].samples] == [s.input_ids for s in full_step[0].samples]


def test_batch_multiplier_over_samples_the_first_generation_batch():
    run = _ScriptedRun(_config(*DS, "grpo.batch_multiplier=2"))
    _, metrics = run.sample_step(1)
    assert [len(prompts) for prompts, _ in run.requests] == [32] * int(metrics["dynamic_sampling/generation_batches"])
    all_seeds = [seed for _, seeds in run.requests for seed in seeds]
    assert all_seeds == rollout_seeds(42, 1, len(all_seeds))
    assert run.train_loader.batch_index == 2 * len(run.requests)


def test_without_dynamic_sampling_every_group_trains():
    run = _ScriptedRun(_config())
    trained, metrics = run.sample_step(1)
    assert metrics == {} and len(run.requests) == 1 and len(trained.samples) == 16


def test_rollout_seeds_from_an_offset_continue_the_index():
    assert rollout_seeds(7, 2, 5, start=3) == rollout_seeds(7, 2, 8)[3:]
