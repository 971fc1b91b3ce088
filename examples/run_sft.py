"""Supervised fine-tuning on the Megatron backend.

    uv run examples/run_sft.py [--config RECIPE.yaml] [key=value ...]

Without --config it runs examples/configs/sft_long_context.yaml: the built-in
base model (pre-trained by this project at a 128-token window) extended 4x
with YaRN by fine-tuning on long documents, with a before/after evaluation.
``--config examples/configs/sft.yaml`` is chat SFT of the tiny model.
"""

from __future__ import annotations

import sys
from pathlib import Path

from nemo_rl.config.entry import run_entry
from nemo_rl.config.schema import validate_sft_config

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "sft_long_context.yaml"


def run(cfg, resolved) -> int:
    from nemo_rl.algorithms.offline_training import summary
    from nemo_rl.algorithms.sft import run_sft  # heavy imports only once the config is known to be good

    print(summary("SFT", run_sft(cfg, resolved), cfg, ["loss"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_entry(argv, DEFAULT_CONFIG, validate_sft_config, run)


if __name__ == "__main__":
    sys.exit(main())
