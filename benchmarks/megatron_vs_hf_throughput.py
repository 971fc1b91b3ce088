"""Training throughput of the project's Megatron policy worker versus a plain transformers loop.

    uv run benchmarks/megatron_vs_hf_throughput.py [--models tiny-qwen2 tiny-qwen2-20m] [--seq-len 1024]
        [--batch-size 4] [--steps 5] [--out results/bench_megatron_vs_hf]

Why: the Megatron path (Ray actor, megatron-core DDP, optimizer and
forward/backward schedule) is what every run trains through; this measures what
that machinery costs, or saves, against the simplest thing that computes the
same update: ``AutoModelForCausalLM`` + ``torch.optim.AdamW`` on the same model
(``--models``: by default the tiny Qwen2 and its 18 M-parameter sibling, each
with the YaRN block of ``examples/configs/sft.yaml``, factor = seq-len / 256),
batch, sequence length, micro-batching and loss (mean next-token NLL over the
loss-masked tokens of the batch), in the same process and on the same device
(CUDA when available, else CPU with ``--num-cpus`` threads on both sides). The
Megatron side is timed from the driver, so Ray's call and transfer overhead is
part of its number, as it is in training.

Each side runs ``--warmup`` untimed steps, then ``--steps`` timed ones. The
first-step losses of both are printed as a sanity check: same weights, same
data, so they must agree to float32 rounding. Prints a table and writes
``results.json`` and ``throughput.png`` under ``--out``. The default run takes
about a minute.

Measured on two otherwise idle CPU cores (default run; first losses equal to
3e-7):

    model            Megatron s/step   HF loop s/step   ratio
    tiny-qwen2             0.163            0.130        0.80
    tiny-qwen2-20m         2.628            2.364        0.90

Where the 20M model's 0.26 s goes, measured apart: the same worker in this
process (``MegatronPolicyWorker.in_process``, no Ray) took 2.44 to 2.60 s a
step over several runs, the loop 2.33 to 2.41 s (tiny-qwen2: 0.150 against
0.133). Profiled over two steps, its ops took 5.02 s of CPU time against the
loop's 4.78 s: matmuls 2.80 s against 2.85 s, but SwiGLU over the fused fc1
output 0.95 s against the loop's activation and product, 0.46 s (each layer's
50 MB fc1 output and gradient are fresh allocations above glibc's mmap
threshold, page-faulted on every step; the loop's gate and up halves are
25 MB heap blocks), and attention over ``[s, b, h, d]`` views 1.16 s against
1.09 s. The rest is Ray's: its idle local cluster (raylet, GCS, agents,
prestarted workers; 4 to 5 % of the two cores) slowed the plain loop by 0.1 s
a step when it ran beside it, and the worker's step via Ray was 0.1 to 0.2 s
slower than in-process. The call itself is cheap: on tiny-qwen2 an empty
actor call took 1 ms and ``Policy.train`` 0.159 s against 0.156 s for
``train_step`` timed inside the worker.

Tried and not kept, each within the machine's step-to-step noise (3 %):
writing SwiGLU's gradients into the fc1 output's own memory (its 31 ms
strided write went, and the page faults moved to the next op); saving
``silu(gate)`` for the backward instead of recomputing it; glibc
``mallopt`` keeping large blocks on the heap (50 MB allocations 10.7 -> 3.0 ms
alone; in-process steps -70, +60, -85, -96 and -5 ms in five A/B pairs, and
through Ray 2.53 and 2.75 s against 2.72 and 2.69 s); contiguous q/k/v for SDPA
(3 ms a layer alone). Not prestarting Ray's idle workers cut the cluster's
idle CPU to 3.8 % but cost a GRPO run 1 s of start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def load_policy_config(
    recipe: str, validate: Callable, seq_len: int, batch_size: int, micro_batch_size: int, overrides: Sequence[str] = ()
):
    """``examples/configs/<recipe>`` validated by ``validate``, at the benchmark's batch shape, on one worker."""
    from nemo_rl.config.loader import load_config, resolve_config

    shape = [
        f"policy.max_total_sequence_length={seq_len}",  # the YaRN factor follows (seq_len / 256)
        f"policy.train_global_batch_size={batch_size}",
        f"policy.train_micro_batch_size={micro_batch_size}",
        "cluster.gpus_per_node=1",
    ]
    return validate(resolve_config(load_config(ROOT / "examples/configs" / recipe, [*shape, *overrides])))


def make_batch(vocab_size: int, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, vocab_size, (batch_size, seq_len), generator=generator)
    return {"input_ids": input_ids, "loss_mask": torch.ones_like(input_ids)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, warmup: int, steps: int, device: torch.device) -> tuple[list[float], list[float]]:
    """(seconds of each timed step, loss of every step including warm-up).

    Only the first loss is comparable across sides: later ones follow each side's LR schedule
    (Megatron warms up from ``lr_warmup_init``; the HF loop uses a constant LR).
    """
    losses = [step() for _ in range(warmup)]
    sync(device)
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        losses.append(step())
        sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds, losses


@contextmanager
def megatron_policy(cfg, model_path: Path, num_cpus: int, **policy_kwargs) -> Iterator:
    """A one-worker ``Policy`` on a local Ray cluster of ``num_cpus`` CPUs; it, its cluster and Ray end on exit."""
    import ray

    from nemo_rl.distributed.ray_init import init_ray
    from nemo_rl.distributed.virtual_cluster import RayVirtualCluster
    from nemo_rl.models.policy.lm_policy import Policy

    init_ray(num_cpus=num_cpus)
    cluster = RayVirtualCluster(1)
    policy = Policy(cluster, cfg.policy, model_path, seed=0, **policy_kwargs)
    try:
        yield policy
    finally:
        policy.shutdown()
        cluster.shutdown()
        ray.shutdown()


def run_megatron(cfg, model_path: Path, batch, micro_batch_size: int, args) -> tuple[list[float], list[float]]:
    from nemo_rl.algorithms.loss_functions import NLLLoss

    with megatron_policy(cfg, model_path, args.num_cpus) as policy:

        def step() -> float:
            metrics = policy.train(batch, NLLLoss(), micro_batch_size)["metrics"]
            return metrics["nll_sum"] / metrics["num_tokens"]

        # train() returns Python floats, so the worker's device work is done when it returns
        return time_steps(step, args.warmup, args.steps, torch.device("cpu"))


def hf_config_with_overrides(pcfg, model_path: Path):
    """The model's HF config with the run's ``hf_config_overrides`` (the YaRN block), as the workers load it."""
    from transformers import AutoConfig

    from nemo_rl.rope.hf_config import apply_hf_config_overrides

    return apply_hf_config_overrides(
        AutoConfig.from_pretrained(model_path), pcfg.effective_hf_config_overrides, pcfg.max_total_sequence_length
    )


def run_hf(cfg, model_path: Path, batch, micro_batch_size: int, args, device) -> tuple[list[float], list[float]]:
    from transformers import AutoModelForCausalLM

    pcfg = cfg.policy
    model = AutoModelForCausalLM.from_pretrained(
        model_path, config=hf_config_with_overrides(pcfg, model_path), dtype=torch.float32, attn_implementation="sdpa"
    ).to(device)
    model.train()
    ocfg = pcfg.megatron_cfg.optimizer
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=ocfg.lr,
        betas=(ocfg.adam_beta1, ocfg.adam_beta2),
        eps=ocfg.adam_eps,
        weight_decay=ocfg.weight_decay,
    )
    input_ids, loss_mask = batch["input_ids"].to(device), batch["loss_mask"].to(device)
    targets, mask = input_ids[:, 1:], loss_mask[:, 1:].float()  # position t predicts token t+1
    num_tokens = mask.sum()

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        nll_sum = torch.zeros((), device=device)
        for start in range(0, len(input_ids), micro_batch_size):
            rows = slice(start, start + micro_batch_size)
            logits = model(input_ids=input_ids[rows]).logits[:, :-1]
            nll = F.cross_entropy(logits.flatten(0, 1).float(), targets[rows].flatten(), reduction="none")
            micro_sum = (nll * mask[rows].flatten()).sum()
            (micro_sum / num_tokens).backward()  # mean over the whole batch's tokens, as NLLLoss
            nll_sum += micro_sum.detach()
        if pcfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), pcfg.max_grad_norm)
        optimizer.step()
        return (nll_sum / num_tokens).item()

    return time_steps(step, args.warmup, args.steps, device)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models", nargs="+", default=["tiny-qwen2", "tiny-qwen2-20m"], help="built-in names or HF directories"
    )
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=None, help="default: the batch size")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="Ray CPUs = torch threads on CPU")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_megatron_vs_hf")
    args = parser.parse_args(argv)
    micro_batch_size = args.micro_batch_size or args.batch_size
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.num_cpus)
    rows = {model: compare(model, micro_batch_size, args, device) for model in args.models}

    print(
        f"\ndevice {device}, batch {args.batch_size} x {args.seq_len} tokens (micro-batch {micro_batch_size}), "
        f"{args.warmup} warm-up + {args.steps} timed steps per side"
    )
    header = f"{'model':16} | {'backend':>8} | {'tokens/s':>10} | {'s/step':>8} | {'first loss':>10} | ratio"
    print(header)
    print("-" * len(header))
    for model, row in rows.items():
        for name in ("megatron", "hf"):
            side = row[name]
            ratio = f"{row['ratio']:.2f}x" if name == "megatron" else ""
            print(
                f"{model:16} | {name:>8} | {side['tokens_per_s']:10.0f} | {side['s_per_step']:8.3f} | "
                f"{side['first_loss']:10.5f} | {ratio}"
            )
    print("ratio: Megatron tokens/s / HF tokens/s (>= 1: the Megatron path is at least as fast)")
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"setup": vars(args) | {"device": str(device), "micro_batch_size": micro_batch_size}, "models": rows}
    (args.out / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    plot(rows, args.out / "throughput.png")
    print(f"results: {args.out / 'results.json'}, {args.out / 'throughput.png'}")
    return summary


def compare(model: str, micro_batch_size: int, args, device: torch.device) -> dict:
    """Both sides on ``model``: tokens/s, s/step, first loss each, and the ratio."""
    from transformers import AutoConfig

    from nemo_rl.config.schema import validate_sft_config
    from nemo_rl.models.builtin_models import resolve_model_path

    cfg = load_policy_config(
        "sft.yaml", validate_sft_config, args.seq_len, args.batch_size, micro_batch_size, [f"policy.model_name={model}"]
    )
    model_path = resolve_model_path(cfg.policy.model_name)
    batch = make_batch(AutoConfig.from_pretrained(model_path).vocab_size, args.batch_size, args.seq_len)
    results = {}
    with tempfile.TemporaryDirectory() as checkpoints:
        os.environ["NRL_MEGATRON_CHECKPOINT_DIR"] = checkpoints  # the HF->Megatron conversion goes here
        results["megatron"] = run_megatron(cfg, model_path, batch, micro_batch_size, args)
    results["hf"] = run_hf(cfg, model_path, batch, micro_batch_size, args, device)
    tokens = args.batch_size * args.seq_len
    row: dict = {
        name: {
            "tokens_per_s": tokens * len(seconds) / sum(seconds),
            "s_per_step": sum(seconds) / len(seconds),
            "step_seconds": seconds,
            "first_loss": losses[0],
        }
        for name, (seconds, losses) in results.items()
    }
    row["ratio"] = row["megatron"]["tokens_per_s"] / row["hf"]["tokens_per_s"]
    row["first_loss_difference"] = abs(row["megatron"]["first_loss"] - row["hf"]["first_loss"])
    return row


def plot(rows: dict, path: Path) -> None:
    """Tokens/s of both sides per model (one panel each: their scales differ)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 3.4), squeeze=False)
    for ax, (model, row) in zip(axes[0], rows.items(), strict=True):
        ax.bar(["Megatron\nworker", "plain HF\nloop"], [row["megatron"]["tokens_per_s"], row["hf"]["tokens_per_s"]])
        ax.set_title(f"{model}\nratio {row['ratio']:.2f}", fontsize=9)
        ax.set_ylabel("tokens/s, higher is better", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
