"""The HF -> Megatron conversion cache: a hit against a conversion, per model.

    uv run benchmarks/conversion_cache.py [--models tiny-qwen2 tiny-qwen2-20m qwen3-0.6b-shape] [--hits 5]
        [--out results/bench_conversion_cache]

Every policy worker start goes through ``checkpoint_cache.ensure_converted``
(global rank 0, under the cache's file lock): the first run of a (model, RoPE
overrides) pair converts, every later one should only check that the entry is
complete and made from the source as it is now. This times that call as the
worker makes it, in a cache root of its own: one forced conversion, then
``--hits`` hits (median shown). Goal: a hit costs <= 2 % of a conversion.
Models are the built-in ones (``qwen3-0.6b-shape`` is built once, 2.4 GB, on
first use). Prints a table and writes ``results.json`` under ``--out``.

A hit reads one small manifest and stats the source's weight files (name,
size, modification time); it never hashes the weights, so its cost does not
grow with the model. What a worker does after either (reading the converted
weights into its shards) is the same for both and not timed here.

Measured on two shared CPU cores (2026-12-06, load 5 to 12), median of 5 hits:

    model            | weights GB | conversion s | hit s  | hit / conversion
    tiny-qwen2       |      0.002 |         0.04 | 0.0002 | 0.49 %
    tiny-qwen2-20m   |      0.074 |         0.49 | 0.0002 | 0.04 %
    qwen3-0.6b-shape |      2.384 |        12.89 | 0.0002 | 0.002 %
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GOAL = 0.02


def sft_policy_config(model_name: str):
    """The SFT recipe's policy for ``model_name``: its YaRN block is what the cache entry is keyed on."""
    from nemo_rl.config.loader import load_config, resolve_config
    from nemo_rl.config.schema import validate_sft_config

    overrides = [f"policy.model_name={model_name}"]
    return validate_sft_config(resolve_config(load_config(ROOT / "examples/configs/sft.yaml", overrides))).policy


def time_model(model_name: str, hits: int, cache_root: Path) -> dict:
    """One forced conversion, then ``hits`` cache hits, through the worker's call."""
    from nemo_rl.models.builtin_models import resolve_model_path
    from nemo_rl.models.megatron.checkpoint_cache import ensure_converted

    cfg = sft_policy_config(model_name)
    model_path = resolve_model_path(model_name)
    args = (model_path, cfg.model_name, cfg.effective_hf_config_overrides, cfg.max_total_sequence_length)
    start = time.perf_counter()
    _, converted = ensure_converted(*args, force_reconvert=True, root=cache_root)
    conversion_s = time.perf_counter() - start
    hit_times = []
    for _ in range(hits):
        start = time.perf_counter()
        _, converted_again = ensure_converted(*args, root=cache_root)
        hit_times.append(time.perf_counter() - start)
        if converted_again:
            raise RuntimeError(f"{model_name}: the cache converted again instead of hitting")
    if not converted:
        raise RuntimeError(f"{model_name}: force_reconvert did not convert")
    hit_s = statistics.median(hit_times)
    weights_gb = sum(f.stat().st_size for f in model_path.glob("*.safetensors")) / 1e9
    return {
        "weights_gb": weights_gb,
        "conversion_s": conversion_s,
        "cache_hit_s": hit_s,
        "cache_hit_all_s": hit_times,
        "hit_share": hit_s / conversion_s,
        "meets_goal": hit_s / conversion_s <= GOAL,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny-qwen2", "tiny-qwen2-20m", "qwen3-0.6b-shape"])
    parser.add_argument("--hits", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "results/bench_conversion_cache")
    args = parser.parse_args()

    results = {}
    with tempfile.TemporaryDirectory() as cache_root:
        for name in args.models:
            results[name] = time_model(name, args.hits, Path(cache_root))

    header = f"{'model':<18} | {'weights GB':>10} | {'conversion s':>12} | {'hit s':>8} | {'hit / conversion':>16}"
    print(header)
    print("-" * len(header))
    for name, row in results.items():
        print(
            f"{name:<18} | {row['weights_gb']:10.3f} | {row['conversion_s']:12.2f} | {row['cache_hit_s']:8.4f} | "
            f"{100 * row['hit_share']:15.2f}%"
        )
    print(f"goal: a hit <= {100 * GOAL:.0f} % of a conversion")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"goal": GOAL, "hits": args.hits, "models": results}, indent=2))
    print(f"results: {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
