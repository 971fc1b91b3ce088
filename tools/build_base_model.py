"""uv run tools/build_base_model.py [--work-dir results/tiny-qwen2-base] [--out DIR] [--steps N] [--force]

Builds the built-in base model ``tiny-qwen2-base`` the way the project builds
everything: pre-training runs through ``examples/run_sft.py`` (Megatron worker,
Ray) in document mode with plain RoPE at a 128-token window, from the random
``tiny-qwen2-base-init``, on the Python standard library plus synthetic
retrieval documents (recipe
``examples/configs/recipes/llm/sft-tiny-qwen2-base-pretrain-1n1cpu-megatron-128.yaml``;
an interrupted build resumes from its last checkpoint). The export is then
checked as a base model must be: it retrieves a passkey inside its window
(>= 95 %) and, with plain RoPE, fails beyond it (<= 20 % at 4x). Only a base
that passes is written to ``--out`` (default: the committed asset,
``nemo_rl/models/assets/tiny-qwen2-base``) with ``build_report.json``: the
command, the recipe, tokens, time and the checks' numbers.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "examples" / "configs" / "recipes" / "llm" / "sft-tiny-qwen2-base-pretrain-1n1cpu-megatron-128.yaml"
IN_WINDOW_MIN = 0.95
BEYOND_WINDOW_MAX = 0.20
DEPTHS = (0.05, 0.25, 0.5, 0.75, 0.95)
TRIALS = 20  # per (length, depth) cell


def _run_sft(argv: list[str]) -> int:
    spec = importlib.util.spec_from_file_location("run_sft", ROOT / "examples" / "run_sft.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def pretrain(work_dir: Path, steps: int | None) -> Path:
    argv = [
        "--config",
        str(RECIPE),
        f"sft.export_hf_dir={work_dir / 'hf'}",
        f"checkpointing.checkpoint_dir={work_dir / 'checkpoints'}",
        f"logger.log_dir={work_dir / 'logs'}",
    ]
    if steps is not None:
        argv += [f"sft.max_num_steps={steps}"]
    if _run_sft(argv) != 0:
        raise SystemExit(f"pre-training failed: examples/run_sft.py {' '.join(argv)}")
    return work_dir / "hf"


def check(export: Path) -> dict:
    """Passkey accuracy per length with plain RoPE (the base as it ships) and in-window perplexity."""
    from nemo_rl.data.builtin_datasets import resolve_dataset_paths
    from nemo_rl.evals.long_context import (
        HFGenerator,
        load_model,
        passkey_grid,
        read_documents,
        sliding_window_perplexity,
    )
    from nemo_rl.models.tiny_base_model import BASE_WINDOW

    lengths = [BASE_WINDOW, 2 * BASE_WINDOW, 4 * BASE_WINDOW]
    model, tokenizer = load_model(export, None, max(lengths))
    points = passkey_grid(HFGenerator(model, tokenizer), tokenizer, lengths, DEPTHS, TRIALS, seed=1)
    by_length = {n: [p.accuracy for p in points if p.length == n] for n in lengths}
    _, val = resolve_dataset_paths("python-stdlib", None, None)
    ppl = sliding_window_perplexity(model, read_documents(val, tokenizer), [BASE_WINDOW], stride=BASE_WINDOW // 2)
    return {
        "passkey": {str(n): sum(a) / len(a) for n, a in by_length.items()},
        "passkey_grid": {str(n): {f"{p.depth:g}": p.accuracy for p in points if p.length == n} for n in lengths},
        "passkey_trials_per_cell": TRIALS,
        "perplexity_in_window": ppl[0].perplexity,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "results" / "tiny-qwen2-base")
    parser.add_argument("--out", type=Path, default=None, help="where the base is written (default: the asset)")
    parser.add_argument("--steps", type=int, default=None, help="pre-training steps (default: the recipe's)")
    parser.add_argument("--force", action="store_true", help="write the base even if a check fails")
    args = parser.parse_args(argv)

    from nemo_rl.models.tiny_base_model import ASSET_DIR, BASE_WINDOW, BUILD_COMMAND, BUILD_REPORT
    from nemo_rl.utils.logger import read_metrics

    start = time.perf_counter()
    export = pretrain(args.work_dir, args.steps)
    train = read_metrics(args.work_dir / "logs", "train")
    checks = check(export)
    inside, beyond = checks["passkey"][str(BASE_WINDOW)], checks["passkey"][str(4 * BASE_WINDOW)]
    print(json.dumps(checks, indent=2))
    failed = []
    if inside < IN_WINDOW_MIN:
        failed.append(f"passkey inside the window {inside:.2f} < {IN_WINDOW_MIN}")
    if beyond > BEYOND_WINDOW_MAX:
        failed.append(f"passkey at 4x with plain RoPE {beyond:.2f} > {BEYOND_WINDOW_MAX} (it should fail there)")
    if failed and not args.force:
        print("the base does not pass: " + "; ".join(failed), file=sys.stderr)
        return 1

    out = args.out or ASSET_DIR
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(export, out)
    report = {
        "command": BUILD_COMMAND + (f" --steps {args.steps}" if args.steps else ""),
        "recipe": str(RECIPE.relative_to(ROOT)),
        "steps": max(r["step"] for r in train),
        "pretraining_tokens": int(sum(r["input_tokens"] for r in train)),
        "train_seconds": sum(r["step_time_s"] for r in train),
        "build_seconds_this_call": time.perf_counter() - start,
        "final_train_loss": train[-1]["loss"],
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPU cores",
        "checks": checks,
        "checks_failed": failed,
        "size_bytes": sum(f.stat().st_size for f in out.iterdir()),
    }
    (out / BUILD_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out} ({report['size_bytes'] / 1e6:.1f} MB, {report['pretraining_tokens']:,} pre-training tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
