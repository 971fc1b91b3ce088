"""How ``VllmGeneration`` spreads requests over its engines, with stand-in engines instead of vLLM actors.

Each engine gets a contiguous share of the prompts (and of the values that go
with them, the seeds), answers come back in prompt order, and an engine with
no prompts is not called.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from nemo_rl.models.generation import vllm_generation
from nemo_rl.models.generation.vllm_generation import VllmGeneration


class _Method:
    """An actor method whose ``.remote`` answers at once (``ray.get`` is the identity in these tests)."""

    def __init__(self, engine: _Engine, answer) -> None:
        self.engine, self.answer = engine, answer

    def remote(self, prompts, *args, **kwargs):
        self.engine.calls.append((prompts, kwargs.get("seeds")))
        return self.answer(self.engine.rank, prompts, kwargs.get("seeds"))


class _Engine:
    def __init__(self, rank: int) -> None:
        self.rank, self.calls = rank, []
        self.generate = _Method(self, lambda rank, prompts, seeds: [(rank, p[0], s) for p, s in zip(prompts, seeds)])
        self.prompt_logprobs = _Method(self, lambda rank, prompts, _: [[-float(p[0])] for p in prompts])


@pytest.fixture
def generation(monkeypatch) -> VllmGeneration:
    monkeypatch.setattr(vllm_generation.ray, "get", lambda futures: futures)
    gen = object.__new__(VllmGeneration)  # no engines started: the stand-ins take their place
    gen.engines = [_Engine(rank) for rank in range(3)]
    gen.cfg = SimpleNamespace(max_new_tokens=4, temperature=1.0, top_p=1.0, stop_strings=None)
    return gen


def test_each_engine_samples_a_contiguous_share_with_its_prompts_seeds(generation):
    prompts = [[i, 100] for i in range(5)]
    out = generation.generate(prompts, seeds=[10, 11, 12, 13, 14])
    assert out == [(0, 0, 10), (0, 1, 11), (1, 2, 12), (1, 3, 13), (2, 4, 14)]


def test_prompt_logprobs_come_back_in_prompt_order_and_idle_engines_are_not_called(generation):
    assert generation.prompt_logprobs([[7, 1], [8, 1]]) == [[-7.0], [-8.0]]
    assert [len(engine.calls) for engine in generation.engines] == [1, 1, 0]
