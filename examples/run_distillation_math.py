"""On-policy distillation on math prompts: vLLM samples from the student, a teacher grades every token.

    uv run examples/run_distillation_math.py [--config RECIPE.yaml] [key=value ...]

Without --config it runs examples/configs/distillation_math.yaml: the built-in tiny Qwen2
student and tiny teacher at 4x the original context with YaRN, on the built-in tiny-math prompts.
"""

from __future__ import annotations

import sys
from pathlib import Path

from nemo_rl.config.entry import run_entry
from nemo_rl.config.schema import validate_distillation_config

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "distillation_math.yaml"


def run(cfg, resolved) -> int:
    from nemo_rl.algorithms.distillation import run_distillation  # heavy imports only once the config is good

    result = run_distillation(cfg, resolved)
    print(
        f"Distillation finished at step {result.final_step}: KL to the teacher {result.last_metrics.get('kl', float('nan')):.4f}, "
        f"token_mult_prob_error {result.last_token_mult_prob_error:.5f}"
        + f"\n  logs and metrics: {cfg.logger.log_dir}"
        + (f"\n  checkpoints: {cfg.checkpointing.checkpoint_dir}" if cfg.checkpointing.enabled else "")
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_entry(argv, DEFAULT_CONFIG, validate_distillation_config, run)


if __name__ == "__main__":
    sys.exit(main())
