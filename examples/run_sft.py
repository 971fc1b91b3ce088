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
    from nemo_rl.algorithms.offline_training import summary
    from nemo_rl.algorithms.sft import run_sft  # heavy imports only once the config is known to be good

    print(summary("SFT", run_sft(cfg, resolved), cfg, ["loss"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_entry(argv, DEFAULT_CONFIG, validate_sft_config, run)


if __name__ == "__main__":
    sys.exit(main())
