"""Train/generate parity by position bucket: the Megatron trainer against vLLM engines with the same or a subtly
different YaRN block, at 4x and 8x the original window.

    uv run benchmarks/parity_by_position.py [--out results/bench_parity_by_position] [--factors 4 8] [--quick]

The rollout loop's probe (``nemo_rl.algorithms.logprob_parity``) compares the
generator's log-probabilities of tokens with the trainer's, overall and per
position bucket (``window``, ``1-2x``, ``2-4x``, ...). Here both engines score
the same random token sequence of the full length teacher-forced (every
position is a "generated" token), so each bucket holds hundreds of tokens:

* ``matched``: vLLM given the trainer's YaRN block (what a run does);
* ``truncate off``: the block with ``truncate: false`` in vLLM only (vLLM 0.11
  ignored the field and always rounded the correction range);
* ``mscale pair``: ``mscale_all_dim: 1`` in vLLM only (attention factor 1.0
  instead of 0.1 ln s + 1; vLLM 0.11 ignored the pair).

Models: the untrained ``tiny-qwen2`` (window 256), the same with its query/key
projections scaled x12 (sharp, position-dependent attention: the functional
test's model), and the pre-trained ``tiny-qwen2-base`` (window 128). Writes
``results.json`` and ``parity_heatmap.png`` (one heatmap per factor: model x
generator rows, bucket columns, log10(error - 1)) under ``--out`` and prints
the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: examples/ is not a package

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

GENERATORS = {"matched": {}, "truncate off": {"truncate": False}, "mscale pair": {"mscale_all_dim": 1}}
MODELS = ("tiny-qwen2", "tiny-qwen2-sharp", "tiny-qwen2-base")
SHARPNESS = 12.0  # the query/key scale of the sharp variant


def model_dir(name: str, work: Path) -> Path:
    """A built-in model's directory; ``tiny-qwen2-sharp`` is made under ``work`` from ``tiny-qwen2``."""
    from safetensors.torch import load_file, save_file

    from nemo_rl.models.builtin_models import resolve_model_path

    if name != "tiny-qwen2-sharp":
        return resolve_model_path(name)
    path = work / name
    if not path.exists():
        shutil.copytree(resolve_model_path("tiny-qwen2"), path)
        weights = load_file(str(path / "model.safetensors"))
        for key in weights:
            if key.endswith(("q_proj.weight", "k_proj.weight")):
                weights[key] = weights[key] * SHARPNESS
        save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def yarn_overrides(window: int, factor: int, **changes) -> dict:
    block = {
        "rope_type": "yarn",
        "rope_theta": 10000,
        "factor": float(factor),
        "original_max_position_embeddings": window,
        "truncate": True,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1,
        "mscale_all_dim": 0,
    }
    return {"rope_scaling": block | changes}


def trainer_logprobs(path: Path, window: int, length: int, ids: torch.Tensor, cluster) -> torch.Tensor:
    """The Megatron policy worker's log-probs of ``ids`` ([1, L]; 0 at position 0), through Ray as in a run, with
    the SFT recipe's YaRN block (factor ``length / window``)."""
    from nemo_rl.config.loader import load_config, resolve_config
    from nemo_rl.config.schema import validate_sft_config
    from nemo_rl.models.policy.lm_policy import Policy

    overrides = [
        f"policy.model_name={path}",
        f"policy.max_total_sequence_length={length}",
        f"policy.hf_config_overrides.rope_scaling.original_max_position_embeddings={window}",
    ]
    cfg = validate_sft_config(resolve_config(load_config(ROOT / "examples" / "configs" / "sft.yaml", overrides)))
    assert cfg.policy.effective_hf_config_overrides == yarn_overrides(window, length // window)
    policy = Policy(cluster, cfg.policy, path, seed=0)
    try:
        return policy.get_logprobs({"input_ids": ids}, 1).double()
    finally:
        policy.shutdown()


def generator_logprobs(path: Path, overrides: dict, length: int, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoTokenizer

    from nemo_rl.evals.generators import VllmGenerator

    generator = VllmGenerator(path, overrides, length, AutoTokenizer.from_pretrained(path))
    try:
        scored = generator.prompt_logprobs([ids[0].tolist()])[0]
    finally:
        generator.close()
    return torch.cat([torch.zeros(1, dtype=torch.float64), torch.tensor(scored, dtype=torch.float64)])[None]


def measure(models: tuple[str, ...], factors: tuple[int, ...], work: Path) -> list[dict]:
    import ray
    from transformers import AutoConfig

    from nemo_rl.algorithms.logprob_parity import measure_parity
    from nemo_rl.distributed.ray_init import init_ray
    from nemo_rl.distributed.virtual_cluster import RayVirtualCluster

    os.environ["NRL_MEGATRON_CHECKPOINT_DIR"] = str(work / "mcore")
    init_ray(num_cpus=2)
    cluster = RayVirtualCluster(1)
    rows = []
    try:
        cases = [(m, f) for m in models for f in factors]
        for name, factor in tqdm(cases, desc="model x factor"):
            path = model_dir(name, work)
            config = AutoConfig.from_pretrained(path)
            window, length = config.max_position_embeddings, config.max_position_embeddings * factor
            vocab = config.vocab_size
            # vLLM scores a prompt only with room for one generated token: 8 short of the window keeps the
            # trainer's row a multiple of the recipe's make_sequence_length_divisible_by.
            tokens = length - 8
            ids = torch.randint(3, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
            trainer = trainer_logprobs(path, window, length, ids, cluster)
            mask = torch.ones(1, tokens)
            mask[0, 0] = 0
            for generator, changes in GENERATORS.items():
                scored = generator_logprobs(path, yarn_overrides(window, factor, **changes), length, ids)
                report = measure_parity(scored, trainer, mask, window)
                rows.append(
                    {
                        "model": name,
                        "window": window,
                        "factor": factor,
                        "generator": generator,
                        "overall": report.overall.error,
                        "generator_kl": report.overall.kl,
                        "buckets": {b: a.error for b, (_, a) in report.buckets.items()},
                        "bucket_kl": {b: a.kl for b, (_, a) in report.buckets.items()},
                    }
                )
    finally:
        cluster.shutdown()
        ray.shutdown()
    return rows


def print_table(rows: list[dict]) -> None:
    buckets = list(dict.fromkeys(b for row in rows for b in row["buckets"]))
    header = f"{'model':18} {'factor':>6} {'generator':13} {'overall':>10} " + " ".join(f"{b:>10}" for b in buckets)
    print(header)
    print("-" * len(header))
    for row in rows:
        cells = " ".join(f"{row['buckets'][b]:10.6f}" if b in row["buckets"] else f"{'':10}" for b in buckets)
        print(f"{row['model']:18} {row['factor']:>5}x {row['generator']:13} {row['overall']:10.6f} {cells}")


def plot(rows: list[dict], factors: tuple[int, ...], path: Path) -> None:
    fig, axes = plt.subplots(1, len(factors), figsize=(6 * len(factors), 4.5), squeeze=False)
    for ax, factor in zip(axes[0], factors, strict=True):
        subset = [r for r in rows if r["factor"] == factor]
        buckets = list(dict.fromkeys(b for r in subset for b in r["buckets"]))
        grid = [[math.log10(max(r["buckets"].get(b, float("nan")) - 1, 1e-9)) for b in buckets] for r in subset]
        image = ax.imshow(grid, cmap="magma", vmin=-8, vmax=0, aspect="auto")
        ax.set_xticks(range(len(buckets)), buckets)
        ax.set_yticks(range(len(subset)), [f"{r['model']} / {r['generator']}" for r in subset], fontsize=7)
        ax.set_title(f"YaRN {factor}x: log10(token_mult_prob_error - 1)")
        for i, r in enumerate(subset):
            for j, b in enumerate(buckets):
                if b in r["buckets"]:
                    ax.text(j, i, f"{r['buckets'][b]:.4f}", ha="center", va="center", fontsize=6, color="cyan")
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/bench_parity_by_position"))
    parser.add_argument("--factors", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--quick", action="store_true", help="the untrained tiny model at 4x only")
    args = parser.parse_args()
    models, factors = (("tiny-qwen2",), (4,)) if args.quick else (tuple(args.models), tuple(args.factors))
    args.out.mkdir(parents=True, exist_ok=True)
    rows = measure(models, factors, args.out / "work")
    print_table(rows)
    (args.out / "results.json").write_text(json.dumps({"rows": rows}, indent=2))
    plot(rows, factors, args.out / "parity_heatmap.png")
    print(f"wrote {args.out / 'results.json'} and {args.out / 'parity_heatmap.png'}")


if __name__ == "__main__":
    main()
