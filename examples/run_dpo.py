"""Direct preference optimization on preference pairs, on a Megatron policy.

    uv run examples/run_dpo.py [--config RECIPE.yaml] [key=value ...]

Without --config it runs examples/configs/dpo.yaml: the built-in tiny Qwen2 model
at 4x its original context with YaRN, on the built-in tiny-preference pairs.
"""

from __future__ import annotations

import sys
from pathlib import Path

from nemo_rl.config.entry import run_entry
from nemo_rl.config.schema import validate_dpo_config

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "dpo.yaml"


def run(cfg, resolved) -> int:
    from nemo_rl.algorithms.dpo import run_dpo  # heavy imports only once the config is known to be good
    from nemo_rl.algorithms.offline_training import summary

    print(summary("DPO", run_dpo(cfg, resolved), cfg, ["loss", "accuracy", "margin"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_entry(argv, DEFAULT_CONFIG, validate_dpo_config, run)


if __name__ == "__main__":
    sys.exit(main())
