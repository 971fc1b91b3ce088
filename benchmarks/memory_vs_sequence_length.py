"""Peak memory of one Megatron training step versus sequence length.

    uv run benchmarks/memory_vs_sequence_length.py [--lengths 1024 2048 4096 8192] [--batch-size 1]
        [--activation-checkpointing] [--plot benchmarks/results/memory_vs_sequence_length.png]

Why: long-context training (YaRN extension to many times the original window)
is bounded by activation memory. With attention that never materialises the
L x L score matrix, a step's memory grows linearly with the sequence length
(x2 per doubling); a materialised score matrix makes it quadratic (x4). This
measures which one the project's model actually is.

The model is the GPTModel the policy worker trains (``transformer_config_from_hf``
+ ``build_gpt_model``, single process, randomly initialised) from ``tiny-qwen2``'s
HF config with the YaRN block of ``examples/configs/sft.yaml`` for the largest
length (factor = max length / 256), so every length runs the same model. One
forward (per-token cross-entropy) + backward of its mean runs per length, each
in a fresh subprocess so that no allocator state carries over. Memory is the
peak growth during the step: ``torch.cuda.max_memory_allocated`` on a GPU, else
the process's peak RSS (``ru_maxrss``) minus its RSS just before the step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = "RESULT "


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(length: int, max_len: int, batch_size: int, activation_checkpointing: bool) -> dict:
    """One forward + backward at ``length`` tokens in this (fresh) process."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from transformers import AutoConfig

    from nemo_rl.config.loader import load_config, resolve_config
    from nemo_rl.config.schema import validate_sft_config
    from nemo_rl.models.builtin_models import resolve_model_path
    from nemo_rl.models.megatron.cpu_compat import enable_cpu_compat
    from nemo_rl.models.megatron.model_builder import ParallelLayout, build_gpt_model, transformer_config_from_hf
    from nemo_rl.rope.hf_config import apply_hf_config_overrides

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    enable_cpu_compat()
    torch.distributed.init_process_group(
        "nccl" if cuda else "gloo", store=torch.distributed.HashStore(), rank=0, world_size=1
    )
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(0)

    overrides = [f"policy.max_total_sequence_length={max_len}"]  # the YaRN factor follows (max_len / 256)
    policy = validate_sft_config(resolve_config(load_config(ROOT / "examples/configs/sft.yaml", overrides))).policy
    model_path = resolve_model_path(policy.model_name)
    hf_config = apply_hf_config_overrides(
        AutoConfig.from_pretrained(model_path), policy.effective_hf_config_overrides, max_len
    )
    tf_config = transformer_config_from_hf(
        hf_config, "float32", ParallelLayout(), activation_checkpointing=activation_checkpointing
    )
    model = build_gpt_model(hf_config, tf_config).to(device).train()

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, hf_config.vocab_size, (batch_size, length), generator=generator).to(device)
    labels = torch.roll(input_ids, shifts=-1, dims=1)
    position_ids = torch.arange(length, device=device).expand(batch_size, -1)

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = current_rss_bytes()
        max_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    start = time.perf_counter()
    per_token_ce = model(input_ids=input_ids, position_ids=position_ids, attention_mask=None, labels=labels)
    per_token_ce.mean().backward()
    if cuda:
        torch.cuda.synchronize()
        peak, below_earlier_peak = torch.cuda.max_memory_allocated(), False
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        below_earlier_peak = peak <= max_before  # the step never exceeded the process's earlier peak RSS
    seconds = time.perf_counter() - start
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()
    return {
        "length": length,
        "peak_mb": (peak - before) / 2**20,
        "seconds": seconds,
        "below_earlier_peak": below_earlier_peak,
        "device": str(device),
    }


def run_in_subprocess(length: int, args) -> dict:
    command = [sys.executable, __file__, "--measure", str(length), "--max-len", str(max(args.lengths))]
    command += ["--batch-size", str(args.batch_size)]
    command += ["--activation-checkpointing"] if args.activation_checkpointing else []
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode or not lines:
        sys.exit(f"length {length} failed (exit code {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT) :])


def plot(rows: list[dict], args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [r["length"] for r in rows]
    memory = [r["peak_mb"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lengths, memory, marker="o", label="measured")
    for slope, name in ((1, "linear"), (2, "quadratic")):
        reference = [memory[0] * (length / lengths[0]) ** slope for length in lengths]
        ax.plot(lengths, reference, linestyle="--", linewidth=1, label=f"{name} from the first point")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel(f"peak memory growth (MB, {rows[0]['device']})")
    checkpointing = ", activation checkpointing" if args.activation_checkpointing else ""
    ax.set_title(f"tiny-qwen2 Megatron fwd+bwd, batch {args.batch_size}{checkpointing}")
    ax.legend()
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--plot", type=Path, default=ROOT / "benchmarks/results/memory_vs_sequence_length.png")
    parser.add_argument("--measure", type=int, help=argparse.SUPPRESS)  # internal: measure one length, print JSON
    parser.add_argument("--max-len", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        result = measure(args.measure, args.max_len, args.batch_size, args.activation_checkpointing)
        print(RESULT + json.dumps(result), flush=True)
        return

    args.lengths = sorted(set(args.lengths))
    rows = []
    for length in args.lengths:
        rows.append(run_in_subprocess(length, args))
        print(f"measured {length} tokens: {rows[-1]['peak_mb']:.1f} MB", flush=True)

    header = f"{'length':>7} | {'peak MB':>9} | {'MB / 1k tok':>11} | {'x prev':>6} | {'exponent':>8} | {'step s':>6}"
    print(
        f"\ndevice {rows[0]['device']}, batch {args.batch_size}, activation checkpointing {args.activation_checkpointing}"
    )
    print(header)
    print("-" * len(header))
    for i, row in enumerate(rows):
        per_1k = row["peak_mb"] / (args.batch_size * row["length"] / 1000)
        growth = exponent = ""
        if i and row["peak_mb"] > 0 and rows[i - 1]["peak_mb"] > 0:
            prev = rows[i - 1]
            ratio = row["peak_mb"] / prev["peak_mb"]
            growth, exponent = f"{ratio:6.2f}", f"{math.log(ratio) / math.log(row['length'] / prev['length']):8.2f}"
        flag = "  (step stayed below an earlier RSS peak: a lower bound)" if row["below_earlier_peak"] else ""
        print(
            f"{row['length']:7d} | {row['peak_mb']:9.1f} | {per_1k:11.2f} | {growth:>6} | {exponent:>8} | "
            f"{row['seconds']:6.2f}{flag}"
        )
    print("x prev per doubling: ~2 = linear in length, ~4 = quadratic (exponent 1 vs 2)")
    plot(rows, args)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
