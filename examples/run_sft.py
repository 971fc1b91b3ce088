"""Supervised fine-tuning on the Megatron backend.

    uv run examples/run_sft.py [--config RECIPE.yaml] [key=value ...]

Without --config it runs examples/configs/sft.yaml: the built-in tiny Qwen2
model trained at 4x its original context with YaRN.
"""

from __future__ import annotations

import sys
from pathlib import Path

from nemo_rl.utils.config_schema import validate_sft_config
from nemo_rl.utils.entry import run_entry

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "sft.yaml"


def run(cfg, resolved) -> int:
    from nemo_rl.algorithms.sft import run_sft  # heavy imports only once the config is known to be good

    result = run_sft(cfg, resolved)
    print(
        f"SFT finished at step {result.final_step}: train loss {result.last_train_loss:.4f}"
        + (f", validation loss {result.last_val_loss:.4f}" if result.last_val_loss is not None else "")
        + (f"\n  converted Megatron checkpoint: {result.converted_checkpoint}" if result.converted_checkpoint else "")
        + f"\n  logs and metrics: {cfg.logger.log_dir}"
        + (f"\n  checkpoints: {cfg.checkpointing.checkpoint_dir}" if cfg.checkpointing.enabled else "")
        + (f"\n  HF export: {result.hf_export}" if result.hf_export else "")
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_entry(argv, DEFAULT_CONFIG, validate_sft_config, run)


if __name__ == "__main__":
    sys.exit(main())
