"""The GRPO entry script refuses a bad recipe before Ray starts or anything is written.

That includes vLLM arguments that contradict the policy's RoPE overrides: they
are only known to conflict once the model's config is read, which happens
before any worker or output directory exists.
"""

from __future__ import annotations

import sys

from tests.helpers import entry_main


def _main():
    return entry_main("run_grpo_math")


def _ray_started() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def test_bad_recipe_fails_fast_with_every_problem(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = _main()(["grpo.num_prompts_per_step=3", "policy.generation.temperature=0.0", "+grpo.max_num_step=2"])
    err = capsys.readouterr().err
    assert code == 2
    assert "grpo.num_prompts_per_step * grpo.num_generations_per_prompt = 12 must be a multiple of" in err
    assert "policy.generation.temperature: 0 makes every response of a group identical" in err
    assert "grpo.max_num_step: unknown key (did you mean grpo.max_num_steps?)" in err
    assert list(tmp_path.iterdir()) == []
    assert not _ray_started()


def test_vllm_overrides_contradicting_the_policy_are_refused_before_start(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = _main()(["+policy.generation.vllm_kwargs.hf_overrides.max_position_embeddings=4096"])
    err = capsys.readouterr().err
    assert code == 2
    assert "policy.generation.vllm_kwargs.hf_overrides.max_position_embeddings: 4096 contradicts 1024" in err
    assert list(tmp_path.iterdir()) == [], "the run directory must not be created"
    assert not _ray_started()
