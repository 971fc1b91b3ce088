"""GRPO's learning curve with sequence packing and context parallelism 2 (the 256k recipe's layout in miniature).

    uv run benchmarks/grpo_cp_packed_curve.py [--out results/bench_grpo_cp_packed_curve] [--steps 20]
        [--layouts cp2-packed cp1-default]

The learning run of ``tests/functional/test_grpo_math.py``
(``test_mean_reward_rises_with_a_format_reward``: the tiny model at 4x its
window with YaRN, the answer-format reward, learning rate 3e-3, 20 steps)
through ``examples/run_grpo_math.py``, on
``grpo-tiny-qwen2-1n3cpu-megatron-yarn-4x-cp2-packed.yaml`` (two policy
workers at CP2 over packed rows, one vLLM engine on a bundle of its own) and,
with ``--layouts ... cp1-default``, on the default layout (one worker,
unpacked, the engine colocated) for comparison. Every request's sampling seed
depends only on the run seed, the step and its index, so the two layouts see
the same rollouts until their weights drift apart by float reduction order.

Writes ``results.json`` (every step's metrics per layout) and
``reward_and_parity.png`` (reward_mean and token_mult_prob_error per step)
under ``--out``, and prints the per-step table. Measured on two cores shared
with other runs (mean reward over steps 1-4 -> steps 17-20, worst parity):

    cp2-packed   0.0122 -> 0.4550   1.0000003   207 s
    cp1-default  0.0122 -> 0.4774   1.0000002   139 s

Steps 1-5 agree to four decimals; later steps drift apart with the weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: examples/ is not a package

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CONFIGS = ROOT / "examples" / "configs"
LAYOUTS = {
    "cp2-packed": CONFIGS / "recipes" / "llm" / "grpo-tiny-qwen2-1n3cpu-megatron-yarn-4x-cp2-packed.yaml",
    "cp1-default": CONFIGS / "grpo_math.yaml",
}
LEARNING_RATE = 3e-3  # the learning test's: constant, no warm-up
LOGGED = ("reward_mean", "token_mult_prob_error", "loss", "kl", "grad_norm", "packing_efficiency", "timing/step_s")


def run_layout(layout: str, steps: int, out: Path) -> dict:
    """One GRPO run of ``layout`` through the entry script; its recipe, wall time and per-step train metrics."""
    import ray

    from examples.run_grpo_math import main as run_grpo_math
    from nemo_rl.utils.logger import read_metrics

    log_dir = out / layout / "logs"
    argv = [
        "--config",
        str(LAYOUTS[layout]),
        f"grpo.max_num_steps={steps}",
        "grpo.val_period=0",
        "checkpointing.enabled=false",
        f"policy.megatron_cfg.optimizer.lr={LEARNING_RATE}",
        f"policy.megatron_cfg.optimizer.min_lr={LEARNING_RATE}",
        f"logger.log_dir={log_dir}",
        "logger.tensorboard_enabled=false",
    ]
    start = time.perf_counter()
    try:
        if run_grpo_math(argv) != 0:
            raise RuntimeError(f"{layout} failed: examples/run_grpo_math.py {' '.join(argv)}")
    finally:
        ray.shutdown()  # each layout starts a local Ray cluster sized for its own workers
    metrics = read_metrics(log_dir, "train")
    return {
        "recipe": str(LAYOUTS[layout].relative_to(ROOT)),
        "argv": argv,
        "seconds": time.perf_counter() - start,
        "steps": [{"step": m["step"], **{k: m[k] for k in LOGGED if k in m}} for m in metrics],
    }


def summarize(result: dict) -> dict:
    """What the learning test asserts (reward over the first and last four steps) and the worst parity."""
    rewards = [s["reward_mean"] for s in result["steps"]]
    return {
        "first_4_reward_mean": sum(rewards[:4]) / len(rewards[:4]),
        "last_4_reward_mean": sum(rewards[-4:]) / len(rewards[-4:]),
        "max_token_mult_prob_error": max(s["token_mult_prob_error"] for s in result["steps"]),
        "seconds": result["seconds"],
    }


def print_table(results: dict[str, dict]) -> None:
    layouts = list(results)
    header = f"{'step':>4} " + " ".join(f"{name + ' reward':>20} {name + ' parity':>20}" for name in layouts)
    print(header)
    print("-" * len(header))
    by_step = {name: {s["step"]: s for s in r["steps"]} for name, r in results.items()}
    for step in sorted({step for rows in by_step.values() for step in rows}):
        cells = []
        for name in layouts:
            row = by_step[name].get(step)
            cells.append(
                f"{row['reward_mean']:20.4f} {row['token_mult_prob_error']:20.7f}" if row else f"{'':20} {'':20}"
            )
        print(f"{step:>4} " + " ".join(cells))
    for name, r in results.items():
        s = summarize(r)
        print(
            f"{name}: reward {s['first_4_reward_mean']:.4f} (steps 1-4) -> {s['last_4_reward_mean']:.4f} (last 4), "
            f"worst parity {s['max_token_mult_prob_error']:.7f}, {s['seconds']:.0f} s"
        )


def plot(results: dict[str, dict], path: Path) -> None:
    fig, (reward_ax, parity_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        steps = [s["step"] for s in r["steps"]]
        reward_ax.plot(steps, [s["reward_mean"] for s in r["steps"]], marker="o", label=name)
        parity_ax.plot(steps, [s["token_mult_prob_error"] - 1 for s in r["steps"]], marker="o", label=name)
    reward_ax.set(title="reward_mean", xlabel="step")
    parity_ax.set(title="token_mult_prob_error - 1", xlabel="step", yscale="log")
    for ax in (reward_ax, parity_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_grpo_cp_packed_curve")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--layouts", nargs="+", choices=tuple(LAYOUTS), default=["cp2-packed"])
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {layout: run_layout(layout, args.steps, args.out) for layout in args.layouts}
    print_table(results)
    summary = {name: summarize(r) for name, r in results.items()}
    (args.out / "results.json").write_text(json.dumps({"layouts": results, "summary": summary}, indent=2))
    plot(results, args.out / "reward_and_parity.png")
    print(f"wrote {args.out / 'results.json'} and {args.out / 'reward_and_parity.png'}")
    return results


if __name__ == "__main__":
    main()
