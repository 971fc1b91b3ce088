"""Reward modeling end to end on CPU: the scalar head on a TP=2 + sequence-parallel Megatron model with YaRN at 8x.

What is checked:

* validation accuracy on the separable ``tiny-preference`` pairs rises clearly
  above chance and the validation loss falls below its starting value;
* the export is an HF ``Qwen2ForSequenceClassification`` directory with the
  run's YaRN block, and transformers' scores of pairs longer than the original
  256-token window equal the trained Megatron model's (an independent
  single-process implementation against the TP=2 + SP one).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from nemo_rl.utils.logger import read_metrics
from tests.helpers import local_ray

pytestmark = [pytest.mark.functional, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "examples" / "configs" / "recipes" / "llm" / "rm-tiny-qwen2-1n2cpu-megatron-yarn-8x-tp2sp.yaml"
ORIGINAL_WINDOW = 256


def test_reward_model_learns_and_exports_to_hf(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from nemo_rl.algorithms.rm import RMRun
    from nemo_rl.config.loader import load_config, resolve_config
    from nemo_rl.config.schema import validate_rm_config
    from nemo_rl.data.preference_dataset import collate_pairs

    resolved = resolve_config(
        load_config(
            RECIPE,
            [
                f"logger.log_dir={tmp_path / 'logs'}",
                f"checkpointing.checkpoint_dir={tmp_path / 'ckpt'}",
                f"rm.export_hf_dir={tmp_path / 'hf'}",
                "logger.tensorboard_enabled=false",
                "checkpointing.enabled=false",
                "rm.max_num_steps=8",
                "rm.val_period=8",
            ],
        )
    )
    with local_ray(2, tmp_path / "mcore"):
        run = RMRun(validate_rm_config(resolved), resolved)
        try:
            result = run.train()
            val = {m["step"]: m for m in read_metrics(tmp_path / "logs", "validation")}
            assert sorted(val) == [0, 8]
            assert val[0]["loss"] == pytest.approx(math.log(2), abs=0.05)  # a fresh head scores both sides alike
            assert val[8]["accuracy"] >= 0.65, val[8]
            assert val[8]["loss"] < val[0]["loss"] - 0.03, val
            assert result.last_validation["accuracy"] == val[8]["accuracy"]

            hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
            assert type(hf).__name__ == "Qwen2ForSequenceClassification" and hf.config.num_labels == 1
            assert hf.config.rope_parameters["rope_type"] == "yarn" and hf.config.rope_parameters["factor"] == 8.0
            long_pairs = [p for p in run.val_data.pairs if len(p.chosen.input_ids) > ORIGINAL_WINDOW][:4]
            assert len(long_pairs) == 4
            batch = collate_pairs(long_pairs, run.tokenizer.pad_token_id, 16)
            got = run.policy.get_scores(batch, micro_batch_size=2)
            with torch.no_grad():
                expected = hf(input_ids=batch["input_ids"]).logits[:, 0]
            # float32, same weights, different kernels (fused QKV/MLP, TP reductions).
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        finally:
            run.close()
