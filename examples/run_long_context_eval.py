"""Long-context evaluation (perplexity vs context length, passkey retrieval) of an HF directory
or of a run's ``step_N`` training checkpoint (exported to HF first).

uv run examples/run_long_context_eval.py [--config examples/configs/long_context_eval.yaml] [key=value ...]
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from nemo_rl.utils.config import ConfigError, load_config, parse_args, resolve_config
from nemo_rl.utils.config_schema import validate_long_context_eval_config

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "long_context_eval.yaml"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config_path, overrides = parse_args(argv, default_config=str(DEFAULT_CONFIG))
    try:
        cfg = validate_long_context_eval_config(resolve_config(load_config(config_path, overrides)))
    except ConfigError as err:
        print(f"Invalid configuration ({config_path}):\n{err}", file=sys.stderr)
        return 2
    from nemo_rl.data.builtin_assets import resolve_dataset_paths, resolve_model_path
    from nemo_rl.evals.long_context import format_table, run_long_context_eval
    from nemo_rl.models.megatron.hf_export import export_training_checkpoint, is_training_checkpoint

    model_dir = Path(cfg.model_dir)
    if is_training_checkpoint(model_dir):  # a step_N directory of a run: export it to HF first
        model_dir = export_training_checkpoint(model_dir, Path(cfg.output_dir) / f"hf_{model_dir.name}")
    _, default_data = resolve_dataset_paths("tiny-chat", None, None)
    perplexity, passkey, report = run_long_context_eval(
        resolve_model_path(str(model_dir)),
        cfg.hf_config_overrides,
        cfg.max_total_sequence_length,
        cfg.long_context_eval,
        Path(cfg.output_dir),
        default_data=default_data,
    )
    print(format_table(perplexity, passkey))
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
