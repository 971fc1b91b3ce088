"""Long-context evaluation (sliding-window perplexity by length, the passkey grid, RULER-style tasks) of an HF
directory or of a run's ``step_N`` training checkpoint (exported to HF first). Without ``long_context_eval.data_path``
perplexity is measured on the built-in python-stdlib validation split (long documents: the interpreter's own
standard library, nothing downloaded).

uv run examples/run_long_context_eval.py [--config examples/configs/long_context_eval.yaml] [key=value ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

from nemo_rl.config.entry import run_entry
from nemo_rl.config.schema import validate_long_context_eval_config

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "long_context_eval.yaml"


def run(cfg, resolved) -> int:
    from nemo_rl.data.builtin_datasets import resolve_dataset_paths
    from nemo_rl.evals.long_context import format_table, run_long_context_eval
    from nemo_rl.models.builtin_models import resolve_model_path
    from nemo_rl.models.megatron.hf_export import export_training_checkpoint, is_training_checkpoint

    model_dir = Path(cfg.model_dir)
    if is_training_checkpoint(model_dir):  # a step_N directory of a run: export it to HF first
        model_dir = export_training_checkpoint(model_dir, Path(cfg.output_dir) / f"hf_{model_dir.name}")
    _, default_data = resolve_dataset_paths("python-stdlib", None, None)
    report = run_long_context_eval(
        resolve_model_path(str(model_dir)),
        cfg.hf_config_overrides,
        cfg.max_total_sequence_length,
        cfg.long_context_eval,
        Path(cfg.output_dir),
        default_data=default_data,
    )
    print(format_table(report))
    print(f"report: {report.report_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_entry(argv, DEFAULT_CONFIG, validate_long_context_eval_config, run)


if __name__ == "__main__":
    sys.exit(main())
