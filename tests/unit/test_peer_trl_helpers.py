"""benchmarks/peer_trl.py's helpers hand both sides the same work: the same pairs, prompts, RoPE and optimizer."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def peer_trl():
    spec = importlib.util.spec_from_file_location("peer_trl_benchmark", ROOT / "benchmarks" / "peer_trl.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_preference_pairs_are_trls_rows_interleaved(peer_trl):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from nemo_rl.data.preference_dataset import collate_pairs

    rows = peer_trl.preference_rows(576, num_pairs=3, seq_len=32, response_len=8)
    ours = collate_pairs(peer_trl.preference_pairs(rows), pad_id=0, divisible_by=8)
    trl = DataCollatorForPreference(pad_token_id=0)(rows)  # all chosen rows, then all rejected
    for side, trl_rows in ((0, slice(0, 3)), (1, slice(3, 6))):
        torch.testing.assert_close(ours["input_ids"][side::2], trl["input_ids"][trl_rows])
        torch.testing.assert_close(ours["loss_mask"][side::2], trl["completion_mask"][trl_rows])
    assert ours["loss_mask"][:, :24].sum() == 0 and ours["loss_mask"][:, 24:].all()


def test_trl_arguments_follow_the_recipes_optimizer(peer_trl, tmp_path):
    from trl import DPOConfig

    from nemo_rl.config.schema import validate_dpo_config

    cfg = peer_trl.load_policy_config("dpo.yaml", validate_dpo_config, 256, 4, 2, peer_trl.CONSTANT_LR)
    ocfg, scheduler = cfg.policy.megatron_cfg.optimizer, cfg.policy.megatron_cfg.scheduler
    assert (scheduler.lr_decay_style, scheduler.lr_warmup_iters, scheduler.lr_warmup_init) == ("constant", 0, ocfg.lr)
    config = DPOConfig(**peer_trl.trl_training_args(cfg.policy, 2, 4, 3, tmp_path))
    assert (config.learning_rate, config.adam_beta1, config.adam_beta2, config.adam_epsilon, config.weight_decay) == (
        ocfg.lr,
        ocfg.adam_beta1,
        ocfg.adam_beta2,
        ocfg.adam_eps,
        ocfg.weight_decay,
    )
    assert config.max_grad_norm == cfg.policy.max_grad_norm
    assert (config.lr_scheduler_type, config.gradient_accumulation_steps) == ("constant", 2)
    assert not (config.bf16 or config.gradient_checkpointing)


def test_the_copied_model_directory_carries_the_runs_rope(peer_trl, tmp_path):
    from transformers import AutoConfig

    from nemo_rl.config.schema import validate_sft_config
    from nemo_rl.models.builtin_models import resolve_model_path

    cfg = peer_trl.load_policy_config("sft.yaml", validate_sft_config, 1024, 4, 2)
    path = resolve_model_path("tiny-qwen2")
    copied = AutoConfig.from_pretrained(peer_trl.model_dir_with_overrides(cfg.policy, path, tmp_path / "model"))
    expected = peer_trl.hf_config_with_overrides(cfg.policy, path)
    assert copied.rope_parameters == expected.rope_parameters
    assert copied.rope_parameters["rope_type"] == "yarn" and copied.rope_parameters["factor"] == 4.0
    assert copied.max_position_embeddings == 1024


def test_grpo_rows_are_the_prompts_the_framework_trains_on_in_its_order(peer_trl):
    from transformers import AutoTokenizer

    from nemo_rl.config.loader import load_config, resolve_config
    from nemo_rl.config.schema import validate_grpo_config
    from nemo_rl.data.builtin_datasets import resolve_dataset_paths
    from nemo_rl.data.dataloader import ResumableDataloader
    from nemo_rl.data.prompt_dataset import load_prompt_dataset, tokenize_prompt
    from nemo_rl.models.builtin_models import resolve_model_path

    cfg = validate_grpo_config(resolve_config(load_config(peer_trl.GRPO_RECIPE)))
    rows = peer_trl.grpo_prompt_rows(cfg)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.policy.tokenizer.name))
    path, _ = resolve_dataset_paths(cfg.data.dataset_name, None, None)
    samples = load_prompt_dataset(path, tokenizer, cfg.policy.max_total_sequence_length - 1)
    loader = ResumableDataloader(samples, cfg.grpo.num_prompts_per_step, cfg.data.shuffle, cfg.grpo.seed)
    ordered = peer_trl.prompts_in_step_order(rows, cfg.grpo.num_prompts_per_step, cfg.data.shuffle, cfg.grpo.seed, 3)
    expected = [sample for _ in range(3) for sample in loader.next_batch()]
    # GRPOTrainer renders a conversational prompt with the same apply_chat_template call as tokenize_prompt
    assert [tokenize_prompt(row["messages"], tokenizer) for row in ordered] == [s.input_ids for s in expected]
    assert [row["answer"] for row in ordered] == [s.answer for s in expected]


def test_rounds_alternate_which_side_goes_first_and_pool_the_timed_steps(peer_trl):
    calls = []

    def side(name: str, seconds: float):
        def run():
            calls.append(name)
            return peer_trl.Side([seconds * len(calls)], [6.0 + len(calls)], {"threads": 2})

        return run

    framework, trl = peer_trl.alternating_rounds(side("framework", 1.0), side("trl", 0.5), rounds=3)
    assert calls == ["framework", "trl", "trl", "framework", "framework", "trl"]
    assert framework.step_seconds == [1.0, 4.0, 5.0] and trl.step_seconds == [1.0, 1.5, 3.0]
    assert framework.losses == [7.0] and trl.losses == [8.0]  # the first round's: the same starting point
    assert [r["first_loss"] for r in trl.extra["rounds"]] == [8.0, 9.0, 12.0]
    assert framework.extra["threads"] == 2


def test_a_comparison_reports_its_ratio_with_the_interval_over_its_rounds(peer_trl):
    def side(rounds: list[list[float]]):
        extra = {"rounds": [{"step_seconds": steps, "first_loss": 1.0} for steps in rounds]}
        return peer_trl.Side([s for steps in rounds for s in steps], [1.0], extra)

    # the framework was 1.25x faster in both rounds, the second on a host twice as slow
    framework, trl = side([[0.8, 0.8], [1.6, 1.6]]), side([[1.0, 1.0], [2.0, 2.0]])
    result = peer_trl.Comparison("sft", "tiny-qwen2", 4096, framework, trl).as_dict()
    assert result["ratio_interval_90"] == pytest.approx((1.25, 1.25))
    # GRPO runs once a side, step j on the same prompts on both: its steps are drawn in pairs
    grpo = peer_trl.Comparison("grpo", "tiny-qwen2", 1, peer_trl.Side([1.0, 0.2, 3.0]), peer_trl.Side([2.0, 0.4, 6.0]))
    assert grpo.ratio_interval == pytest.approx((2.0, 2.0))
