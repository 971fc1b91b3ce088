"""GRPO on math prompts, with vLLM rollouts and a Megatron policy.

    uv run examples/run_grpo_math.py [--config RECIPE.yaml] [key=value ...]

Without --config it runs examples/configs/grpo_math.yaml: the built-in tiny
Qwen2 model at 4x its original context with YaRN, on the built-in tiny-math prompts.
"""

from __future__ import annotations

import sys
from pathlib import Path

from nemo_rl.config.entry import run_entry
from nemo_rl.config.schema import validate_grpo_config

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "grpo_math.yaml"


def run(cfg, resolved) -> int:
    from nemo_rl.algorithms.grpo import run_grpo  # heavy imports only once the config is known to be good

    result = run_grpo(cfg, resolved)
    print(
        f"GRPO finished at step {result.final_step}: reward {result.last_reward_mean:.4f}, "
        f"token_mult_prob_error {result.last_token_mult_prob_error:.5f}"
        + (f", validation reward {result.last_val_reward_mean:.4f}" if result.last_val_reward_mean is not None else "")
        + f"\n  logs and metrics: {cfg.logger.log_dir}"
        + (f"\n  checkpoints: {cfg.checkpointing.checkpoint_dir}" if cfg.checkpointing.enabled else "")
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_entry(argv, DEFAULT_CONFIG, validate_grpo_config, run)


if __name__ == "__main__":
    sys.exit(main())
