"""Reward-model training (Bradley-Terry) on preference pairs, on a Megatron policy.

    uv run examples/run_rm.py [--config RECIPE.yaml] [key=value ...]

Without --config it runs examples/configs/rm.yaml: the built-in tiny Qwen2 model
at 4x its original context with YaRN, on the built-in tiny-preference pairs.
"""

from __future__ import annotations

import sys
from pathlib import Path

from nemo_rl.config.entry import run_entry
from nemo_rl.config.schema import validate_rm_config

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "rm.yaml"


def run(cfg, resolved) -> int:
    from nemo_rl.algorithms.offline_training import summary
    from nemo_rl.algorithms.rm import run_rm  # heavy imports only once the config is known to be good

    print(summary("Reward modeling", run_rm(cfg, resolved), cfg, ["loss", "accuracy", "margin"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_entry(argv, DEFAULT_CONFIG, validate_rm_config, run)


if __name__ == "__main__":
    sys.exit(main())
